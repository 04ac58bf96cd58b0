//! The server idempotency layer over `MemoryStore`, row by row of docs/guides/idempotency.md's
//! tables: replays, 409/422/400/413/503 answers with their problem types, keys that are empty,
//! long, non-ASCII, repeated or structured-field strings, scopes, stored and unstored statuses,
//! response bounds, clients that go away and handlers that panic.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{HeaderValue, Request, Response, StatusCode};
use sturdy::idempotency::server::{
    conformance, problem, ByCredentials, IdempotencyLayer, LockToken, MemoryStore, StoredResponse,
};
use tokio::sync::Notify;
use tower::ServiceExt;

type Hits = Arc<AtomicUsize>;

fn layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
}

/// `/orders` (POST, PATCH and PUT) answering 201 with a header and the body echoed.
fn orders(layer: IdempotencyLayer<MemoryStore>) -> (Router, Hits) {
    let hits = Hits::default();
    let h = hits.clone();
    let handler = move |body: String| {
        let h = h.clone();
        async move {
            let n = h.fetch_add(1, Ordering::SeqCst) + 1;
            Response::builder()
                .status(201)
                .header("x-order", format!("o_{n}"))
                .header("date", "Mon, 01 Jan 2024 00:00:00 GMT")
                .body(Body::from(format!("created {body}")))
                .unwrap()
        }
    };
    let app = Router::new()
        .route(
            "/orders",
            post(handler.clone())
                .patch(handler.clone())
                .put(handler.clone()),
        )
        .route("/other", post(handler))
        .layer(layer);
    (app, hits)
}

fn order(key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut b = Request::post("/orders").header("authorization", "Bearer c1");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::from(body)).unwrap()
}

async fn send(app: &Router, r: Request<Body>) -> (StatusCode, http::HeaderMap, Vec<u8>) {
    let res = app.clone().oneshot(r).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap()
        .to_vec();
    (parts.status, parts.headers, body)
}

/// Asserts a problem answer of `status` and `type`.
fn is_problem(got: &(StatusCode, http::HeaderMap, Vec<u8>), status: u16, ty: &str) {
    assert_eq!(
        got.0.as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(&got.2)
    );
    assert_eq!(got.1["content-type"], "application/problem+json");
    let v: serde_json::Value = serde_json::from_slice(&got.2).unwrap();
    assert_eq!(v["type"], ty);
    assert_eq!(v["status"], status);
    assert!(v["title"].is_string() && v["detail"].is_string(), "{v}");
}

#[tokio::test]
async fn a_repeat_is_replayed_without_connection_headers() {
    let (app, hits) = orders(layer());
    let first = send(&app, order(Some("k1"), "{\"a\":1}")).await;
    assert_eq!(first.0, 201);
    let again = send(&app, order(Some("k1"), "{\"a\":1}")).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(again.0, 201);
    assert_eq!(again.1["idempotent-replayed"], "true");
    assert_eq!(again.1["x-order"], "o_1");
    assert_eq!(again.2, first.2);
    // "headers except connection-level ones such as Date and Content-Length"
    assert_ne!(
        again.1.get("date").map(HeaderValue::as_bytes),
        Some(&b"Mon, 01 Jan 2024 00:00:00 GMT"[..]),
        "the stored Date was replayed"
    );
    assert!(again.1.get_all("content-length").iter().count() <= 1);
}

#[tokio::test]
async fn invalid_keys_get_400() {
    let (app, hits) = orders(layer());
    let long = "k".repeat(256);
    for key in ["", " ", "a b", "a\tb", long.as_str()] {
        let got = send(&app, order(Some(key), "{}")).await;
        is_problem(&got, 400, problem::INVALID_KEY);
    }
    let mut r = order(None, "{}");
    r.headers_mut().insert(
        "idempotency-key",
        HeaderValue::from_bytes("café".as_bytes()).unwrap(),
    );
    is_problem(&send(&app, r).await, 400, problem::INVALID_KEY);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    let max = "k".repeat(255);
    assert_eq!(send(&app, order(Some(&max), "{}")).await.0, 201);
    assert_eq!(
        send(&app, order(Some("~!#$%&'*+-.^_`|"), "{}")).await.0,
        201
    );
}

#[tokio::test]
async fn repeated_key_headers() {
    let (app, hits) = orders(layer());
    let two = |a: &'static str, b: &'static str| {
        let mut r = order(None, "{}");
        r.headers_mut()
            .append("idempotency-key", HeaderValue::from_static(a));
        r.headers_mut()
            .append("idempotency-key", HeaderValue::from_static(b));
        r
    };
    is_problem(&send(&app, two("a", "b")).await, 400, problem::INVALID_KEY);
    is_problem(
        &send(&app, two("k", "\"k\"")).await,
        400,
        problem::INVALID_KEY,
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    // Byte-identical repeats are one key.
    assert_eq!(send(&app, two("same", "same")).await.0, 201);
    let again = send(&app, order(Some("same"), "{}")).await;
    assert_eq!(again.1["idempotent-replayed"], "true");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_structured_field_string_key_is_the_same_key() {
    // "Keys are 1 to 255 visible ASCII characters, sent bare or as a structured-field string".
    let (app, hits) = orders(layer());
    assert_eq!(send(&app, order(Some("\"sf-1\""), "{}")).await.0, 201);
    let again = send(&app, order(Some("sf-1"), "{}")).await;
    assert_eq!(again.0, 201);
    assert_eq!(
        again.1.get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn same_key_other_request_is_422() {
    let (app, hits) = orders(layer());
    let with = |method: &str, uri: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", "Bearer c1")
            .header("idempotency-key", "k-fp")
            .body(Body::from(body))
            .unwrap()
    };
    assert_eq!(
        send(&app, with("POST", "/orders?a=1&b=2", "{}")).await.0,
        201
    );
    for r in [
        with("POST", "/orders?a=1&b=2", "{ }"),
        with("POST", "/orders?b=2&a=1", "{}"),
        with("POST", "/orders", "{}"),
        with("POST", "/other?a=1&b=2", "{}"),
        with("PATCH", "/orders?a=1&b=2", "{}"),
    ] {
        is_problem(&send(&app, r).await, 422, problem::KEY_REUSED);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn missing_keys_and_other_methods() {
    let (app, hits) = orders(layer().with_require_key(true));
    is_problem(
        &send(&app, order(None, "{}")).await,
        400,
        problem::MISSING_KEY,
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    // PUT is not among the methods: it passes through untouched, twice.
    for _ in 0..2 {
        let r = Request::put("/orders")
            .header("idempotency-key", "k-put")
            .body(Body::from("{}"))
            .unwrap();
        let got = send(&app, r).await;
        assert_eq!(got.0, 201);
        assert!(got.1.get("idempotent-replayed").is_none());
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // Without require_key, a POST without a key runs each time.
    let (app, hits) = orders(layer());
    send(&app, order(None, "{}")).await;
    send(&app, order(None, "{}")).await;
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // with_methods: PUT replayed.
    let (app, hits) = orders(layer().with_methods([http::Method::PUT]));
    for _ in 0..2 {
        let r = Request::put("/orders")
            .header("idempotency-key", "k-put")
            .body(Body::from("{}"))
            .unwrap();
        send(&app, r).await;
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bodies_at_and_over_the_limit() {
    let (app, hits) = orders(layer().with_body_limit(10));
    assert_eq!(send(&app, order(Some("b10"), "0123456789")).await.0, 201);
    is_problem(
        &send(&app, order(Some("b11"), "0123456789A")).await,
        413,
        problem::BODY_TOO_LARGE,
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

fn statuses(codes: Vec<u16>) -> (Router, Hits, IdempotencyLayer<MemoryStore>) {
    let hits = Hits::default();
    let h = hits.clone();
    let codes = Arc::new(codes);
    let l = layer();
    let app = Router::new().route(
        "/orders",
        post(move || {
            let h = h.clone();
            let codes = codes.clone();
            async move {
                let n = h.fetch_add(1, Ordering::SeqCst);
                let code = codes.get(n).copied().unwrap_or(201);
                Response::builder()
                    .status(code)
                    .body(Body::from(format!("answer {n}")))
                    .unwrap()
            }
        }),
    );
    (app, hits, l)
}

#[tokio::test]
async fn unstored_statuses_run_again_at_once() {
    for code in [500, 503, 408, 425, 429] {
        let (app, hits, l) = statuses(vec![code]);
        let app = app.layer(l);
        assert_eq!(send(&app, order(Some("k"), "{}")).await.0.as_u16(), code);
        let again = send(&app, order(Some("k"), "{}")).await;
        assert_eq!(again.0, 201, "after {code}");
        assert_eq!(hits.load(Ordering::SeqCst), 2, "after {code}");
    }
    // with_store_server_errors: a 5xx is replayed; 408, 425, 429 never are.
    for (code, stored) in [
        (500, true),
        (502, true),
        (408, false),
        (425, false),
        (429, false),
    ] {
        let (app, hits, l) = statuses(vec![code]);
        let app = app.layer(l.with_store_server_errors(true));
        send(&app, order(Some("k"), "{}")).await;
        let again = send(&app, order(Some("k"), "{}")).await;
        if stored {
            assert_eq!(again.0.as_u16(), code);
            assert_eq!(again.1["idempotent-replayed"], "true");
            assert_eq!(hits.load(Ordering::SeqCst), 1);
        } else {
            assert_eq!(again.0, 201, "{code} was stored");
            assert_eq!(hits.load(Ordering::SeqCst), 2);
        }
    }
}

#[tokio::test]
async fn a_response_over_the_limit_is_a_stored_500() {
    let (app, hits) = orders(layer().with_response_limit(10));
    let first = send(&app, order(Some("big"), "0123456789")).await;
    is_problem(&first, 500, problem::RESPONSE_TOO_LARGE);
    let again = send(&app, order(Some("big"), "0123456789")).await;
    is_problem(&again, 500, problem::RESPONSE_TOO_LARGE);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_response_the_store_cannot_keep_reaches_the_first_client() {
    let store = MemoryStore::default().with_max_bytes(2_000).unwrap();
    let (app, hits) = orders(IdempotencyLayer::new(store, ByCredentials::default()));
    let big: &'static str = Box::leak("x".repeat(5_000).into_boxed_str());
    let first = send(&app, order(Some("huge"), big)).await;
    assert_eq!(first.0, 201);
    assert_eq!(first.2.len(), "created ".len() + 5_000);
    let again = send(&app, order(Some("huge"), big)).await;
    is_problem(&again, 500, problem::RESPONSE_TOO_LARGE);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[test]
fn invalid_settings_are_reported_when_built() {
    assert!(layer().with_ttl(Duration::ZERO).is_err());
    assert!(layer().with_lease(Duration::from_micros(999)).is_err());
    assert!(layer().with_lease(Duration::ZERO).is_err());
    assert!(layer().with_lease(Duration::from_millis(1)).is_ok());
    assert!(layer().with_ttl(Duration::MAX).is_ok());
    assert!(MemoryStore::new(0).is_err());
    assert!(MemoryStore::default().with_max_bytes(0).is_err());
    let msg = MemoryStore::new(0).unwrap_err().to_string();
    assert!(!msg.is_empty());
}

/// `/orders` whose handler waits for `gate` before it answers 201.
fn gated(l: IdempotencyLayer<MemoryStore>) -> (Router, Hits, Hits, Arc<Notify>) {
    let started = Hits::default();
    let done = Hits::default();
    let gate = Arc::new(Notify::new());
    let (s, d, g) = (started.clone(), done.clone(), gate.clone());
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let (s, d, g) = (s.clone(), d.clone(), g.clone());
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    g.notified().await;
                    d.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, "done")
                }
            }),
        )
        .layer(l);
    (app, started, done, gate)
}

async fn until(mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not met in 2.5 s");
}

#[tokio::test]
async fn a_repeat_in_flight_gets_409_then_the_stored_response() {
    let (app, started, _done, gate) = gated(layer());
    let a = app.clone();
    let first = tokio::spawn(async move { send(&a, order(Some("fly"), "{}")).await });
    until(|| started.load(Ordering::SeqCst) == 1).await;
    let got = send(&app, order(Some("fly"), "{}")).await;
    is_problem(&got, 409, problem::IN_FLIGHT);
    assert_eq!(got.1["retry-after"], "1");
    gate.notify_one();
    assert_eq!(first.await.unwrap().0, 201);
    let again = send(&app, order(Some("fly"), "{}")).await;
    assert_eq!(again.0, 201);
    assert_eq!(again.1["idempotent-replayed"], "true");
    assert_eq!(started.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_gone_mid_handler_leaves_it_running_and_stored() {
    let (app, started, done, gate) = gated(layer());
    let a = app.clone();
    let first = tokio::spawn(async move { send(&a, order(Some("gone"), "{}")).await });
    until(|| started.load(Ordering::SeqCst) == 1).await;
    first.abort();
    let _ = first.await;
    // Still running: 409.
    is_problem(
        &send(&app, order(Some("gone"), "{}")).await,
        409,
        problem::IN_FLIGHT,
    );
    gate.notify_one();
    until(|| done.load(Ordering::SeqCst) == 1).await;
    // Its response is stored; the handler ran once.
    let mut again = send(&app, order(Some("gone"), "{}")).await;
    for _ in 0..100 {
        if again.0 != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        again = send(&app, order(Some("gone"), "{}")).await;
    }
    assert_eq!(again.0, 201);
    assert_eq!(again.1["idempotent-replayed"], "true");
    assert_eq!(again.2, b"done");
    assert_eq!(started.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_store_full_of_running_requests_answers_503() {
    let store = MemoryStore::new(1).unwrap();
    let (app, started, _done, gate) = gated(IdempotencyLayer::new(
        store.clone(),
        ByCredentials::default(),
    ));
    let a = app.clone();
    let first = tokio::spawn(async move { send(&a, order(Some("one"), "{}")).await });
    until(|| started.load(Ordering::SeqCst) == 1).await;
    let got = send(&app, order(Some("two"), "{}")).await;
    is_problem(&got, 503, problem::STORE_UNAVAILABLE);
    assert_eq!(got.1["retry-after"], "1");
    assert_eq!(started.load(Ordering::SeqCst), 1);
    gate.notify_one();
    first.await.unwrap();
    assert_eq!(store.len(), 1);
    // Now the completed response makes room.
    let b = app.clone();
    let second = tokio::spawn(async move { send(&b, order(Some("two"), "{}")).await });
    until(|| started.load(Ordering::SeqCst) == 2).await;
    gate.notify_one();
    assert_eq!(second.await.unwrap().0, 201);
}

#[tokio::test]
async fn a_panicking_handler_frees_its_key_at_once() {
    let hits = Hits::default();
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let h = h.clone();
                async move {
                    if h.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("handler failed");
                    }
                    (StatusCode::CREATED, "ok")
                }
            }),
        )
        .layer(layer());
    let a = app.clone();
    let first = tokio::spawn(async move { a.oneshot(order(Some("p"), "{}")).await });
    assert!(first.await.unwrap_err().is_panic());
    let again = send(&app, order(Some("p"), "{}")).await;
    assert_eq!(again.0, 201, "the retry right after a panic did not run");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn scopes_separate_clients() {
    let (app, hits) = orders(layer());
    let with = |auth: &str, cookie: Option<&str>| {
        let mut b = Request::post("/orders")
            .header("authorization", auth)
            .header("idempotency-key", "shared-key");
        if let Some(c) = cookie {
            b = b.header("cookie", c);
        }
        b.body(Body::from("{}")).unwrap()
    };
    send(&app, with("Bearer a", None)).await;
    let b = send(&app, with("Bearer b", None)).await;
    assert!(b.1.get("idempotent-replayed").is_none());
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    let a = send(&app, with("Bearer a", None)).await;
    assert_eq!(a.1["idempotent-replayed"], "true");
    assert_eq!(a.1["x-order"], "o_1");
    // A changing cookie is a new scope by default ...
    send(&app, with("Bearer a", Some("session_id=s1; _ga=1"))).await;
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    // ... and not with with_cookies.
    let (app, hits) = orders(IdempotencyLayer::new(
        MemoryStore::default(),
        ByCredentials::default().with_cookies(["session_id"]),
    ));
    send(&app, with("Bearer a", Some("session_id=s1; _ga=1"))).await;
    let again = send(&app, with("Bearer a", Some("_ga=2; session_id=s1"))).await;
    assert_eq!(again.1["idempotent-replayed"], "true");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn stored_memory_expires_and_is_counted() {
    let store = MemoryStore::default();
    assert!(store.is_empty());
    let l = IdempotencyLayer::new(store.clone(), ByCredentials::default())
        .with_ttl(Duration::from_millis(100))
        .unwrap();
    let (app, hits) = orders(l);
    send(&app, order(Some("ttl"), "{}")).await;
    assert_eq!(store.len(), 1);
    assert!(store.heap_bytes() > 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.len(), 0);
    let again = send(&app, order(Some("ttl"), "{}")).await;
    assert!(again.1.get("idempotent-replayed").is_none());
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[test]
fn stored_responses_round_trip_any_bytes() {
    let all: Vec<u8> = (0..=255u8).collect();
    let r = StoredResponse {
        status: 201,
        headers: vec![("x-bin".to_owned(), all.clone())],
        body: bytes::Bytes::from(all),
    };
    let back = StoredResponse::from_json(&r.to_json()).unwrap();
    assert_eq!(back.status, 201);
    assert_eq!(back.headers, r.headers);
    assert_eq!(back.body, r.body);
    assert!(StoredResponse::from_json(b"not json").is_none());
    let t = LockToken::random();
    assert_ne!(t, LockToken::random());
    assert_eq!(LockToken::from_u128(t.as_u128()), t);
    assert_eq!(t.to_string().len(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_passes_the_conformance_suite() {
    let store = MemoryStore::default();
    conformance::run(store.clone(), store).await;
}

#[tokio::test]
async fn on_event_sees_replays_and_refusals() {
    let events = Hits::default();
    let e = events.clone();
    let (app, _) = orders(layer().on_event(move |_ev| {
        e.fetch_add(1, Ordering::SeqCst);
    }));
    send(&app, order(Some("ev"), "{}")).await;
    assert_eq!(events.load(Ordering::SeqCst), 0);
    send(&app, order(Some("ev"), "{}")).await; // replayed
    send(&app, order(Some("ev"), "{x}")).await; // 422
    send(&app, order(Some(""), "{}")).await; // 400
    assert_eq!(events.load(Ordering::SeqCst), 3);
}
