//! docs/guides/idempotency.md and sturdy-idempotency's rustdoc, read literally: the request
//! table (replayed headers, key headers, query order, methods, stored 5xx, the store full of
//! running requests), the problem JSON the guide prints, the settings that must fail when the
//! layer is built, client scopes, the event hook, and the rows of the failure table that other
//! tests do not reach: a connection dropped after the handler committed (over the wire), a
//! response over the limit, a response the memory store cannot keep, a worker that crashes with
//! a shared Redis store, and a server that shuts down mid-handler.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderName, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use sturdy::core::events::Event;
use sturdy::idempotency::server::{
    problem, ByCredentials, IdempotencyLayer, IdempotencyStore, MemoryStore,
};
use tower::ServiceExt;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A handler that counts its runs, sleeps `delay`, then answers 201 with `reply` (and two
/// headers of its own), or `status` when given.
fn orders<St>(
    layer: IdempotencyLayer<St>,
    runs: Arc<AtomicUsize>,
    delay: Duration,
    reply: Bytes,
    status: StatusCode,
) -> Router
where
    St: IdempotencyStore + Clone,
{
    let r2 = runs.clone();
    let reply2 = reply.clone();
    Router::new()
        .route(
            "/orders",
            post(move |_body: Bytes| {
                let runs = runs.clone();
                let reply = reply.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    runs.fetch_add(1, Ordering::SeqCst);
                    Response::builder()
                        .status(status)
                        .header("x-order", "o-1")
                        .header("date", "Mon, 01 Jan 2024 00:00:00 GMT")
                        .body(Body::from(reply))
                        .unwrap()
                }
            })
            .put(move |_body: Bytes| {
                let runs = r2.clone();
                let reply = reply2.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::OK, reply)
                }
            }),
        )
        .layer(layer)
}

fn simple(layer: IdempotencyLayer<MemoryStore>, runs: Arc<AtomicUsize>) -> Router {
    orders(
        layer,
        runs,
        Duration::ZERO,
        Bytes::from_static(b"order o-1"),
        StatusCode::CREATED,
    )
}

fn layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
}

fn req(method: Method, uri: &str, key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", "Bearer client-1");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::from(body)).unwrap()
}

fn post_req(key: &str) -> Request<Body> {
    req(Method::POST, "/orders", Some(key), "{}")
}

async fn send(app: &Router, r: Request<Body>) -> (StatusCode, http::HeaderMap, Bytes) {
    let res = app.clone().oneshot(r).await.unwrap();
    let (parts, body) = res.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

fn problem_type(body: &Bytes) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["type"].as_str().unwrap_or("").to_owned()
}

/// The guide's server example, with a `create_order` of our own: it compiles and serves.
#[tokio::test]
async fn the_guides_server_example_compiles_and_requires_a_key() {
    async fn create_order() -> (StatusCode, &'static str) {
        (StatusCode::CREATED, "order")
    }
    use sturdy_idempotency_alias::server::{ByCredentials, IdempotencyLayer, MemoryStore};

    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_require_key(true);
    let app = axum::Router::new()
        .route("/orders", axum::routing::post(create_order))
        .layer(layer);
    let (status, headers, body) = send(&app, req(Method::POST, "/orders", None, "{}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(problem_type(&body), problem::MISSING_KEY);
    let (status, _, _) = send(&app, post_req("k")).await;
    assert_eq!(status, StatusCode::CREATED);
}

// The guide names the crate `sturdy_idempotency`; through the umbrella it is this module.
mod sturdy_idempotency_alias {
    pub(crate) use sturdy::idempotency::server;
}

/// "the stored response (status, headers except connection-level ones such as `Date` and
/// `Content-Length`, body) with `Idempotent-Replayed: true`; the handler does not run"
#[tokio::test]
async fn a_replay_has_the_status_headers_and_body_but_not_the_stored_date() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple(layer(), runs.clone());
    let (s1, h1, b1) = send(&app, post_req("k-replay")).await;
    assert_eq!(s1, StatusCode::CREATED);
    assert_eq!(h1["date"], "Mon, 01 Jan 2024 00:00:00 GMT");
    assert!(h1.get("idempotent-replayed").is_none());
    let (s2, h2, b2) = send(&app, post_req("k-replay")).await;
    assert_eq!((s2, b2), (s1, b1));
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(h2["x-order"], "o-1");
    assert!(
        h2.get("date").is_none(),
        "the handler's Date is connection-level, not replayed: {h2:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "two or more different key headers on one request (identical repeats are one key)":
/// 400 invalid for two keys; identical repeats run and replay as one key.
#[tokio::test]
async fn two_different_key_headers_are_invalid_and_identical_repeats_are_one_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple(layer(), runs.clone());
    let two = |a: &str, b: &str| {
        Request::post("/orders")
            .header("authorization", "Bearer client-1")
            .header("idempotency-key", a)
            .header("idempotency-key", b)
            .body(Body::from("{}"))
            .unwrap()
    };
    let (s, h, b) = send(&app, two("k-a", "k-b")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(problem_type(&b), problem::INVALID_KEY);
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    let (s, _, _) = send(&app, two("k-same", "k-same")).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, h, _) = send(&app, post_req("k-same")).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        h["idempotent-replayed"], "true",
        "the repeated header is one key"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "Keys are 1 to 255 visible ASCII characters, sent bare or as a structured-field string":
/// the quoted form of the IETF draft is accepted and replayed.
#[tokio::test]
async fn a_structured_field_string_key_is_accepted_and_replayed() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple(layer(), runs.clone());
    let k = "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"";
    let (s, _, _) = send(&app, post_req(k)).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, h, _) = send(&app, post_req(k)).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["idempotent-replayed"], "true");
    // The same key sent bare is the same key.
    let (s, h, _) = send(&app, post_req("8e03978e-40d5-43e8-bc93-6894a57f9324")).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        h["idempotent-replayed"], "true",
        "bare and quoted are one key"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "the path and query (byte for byte: `?a=1&b=2` and `?b=2&a=1` are two requests)": the same
/// key with the query reordered is 422 reused.
#[tokio::test]
async fn a_reordered_query_under_the_same_key_is_422_reused() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple(layer(), runs.clone());
    let (s, _, _) = send(
        &app,
        req(Method::POST, "/orders?a=1&b=2", Some("k-q"), "{}"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, h, b) = send(
        &app,
        req(Method::POST, "/orders?b=2&a=1", Some("k-q"), "{}"),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(problem_type(&b), problem::KEY_REUSED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "Requests with a method other than POST and PATCH (set the methods with `with_methods`) ...
/// pass through untouched."
#[tokio::test]
async fn a_put_with_a_key_runs_each_time_unless_put_is_named() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple(layer(), runs.clone());
    for _ in 0..2 {
        let (s, h, _) = send(&app, req(Method::PUT, "/orders", Some("k-put"), "{}")).await;
        assert_eq!(s, StatusCode::OK);
        assert!(h.get("idempotent-replayed").is_none());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple(layer().with_methods([Method::PUT]), runs.clone());
    let (s, _, _) = send(&app, req(Method::PUT, "/orders", Some("k-put"), "{}")).await;
    assert_eq!(s, StatusCode::OK);
    let (_, h, _) = send(&app, req(Method::PUT, "/orders", Some("k-put"), "{}")).await;
    assert_eq!(h["idempotent-replayed"], "true");
    // POST is no longer among the methods: it passes through.
    send(&app, post_req("k-post")).await;
    let (_, h, _) = send(&app, post_req("k-post")).await;
    assert!(h.get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// "5xx (`with_store_server_errors(true)` stores them)": a stored 500 is replayed and the
/// handler runs once.
#[tokio::test]
async fn with_store_server_errors_a_500_is_replayed() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = orders(
        layer().with_store_server_errors(true),
        runs.clone(),
        Duration::ZERO,
        Bytes::from_static(b"boom"),
        StatusCode::INTERNAL_SERVER_ERROR,
    );
    let (s, _, _) = send(&app, post_req("k-500")).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    let (s, h, b) = send(&app, post_req("k-500")).await;
    assert_eq!(
        (s, b.as_ref()),
        (StatusCode::INTERNAL_SERVER_ERROR, &b"boom"[..])
    );
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "`with_ttl` and `with_lease` return an error for a zero TTL or a lease under 1 ms, and
/// `MemoryStore::new(0)` for a store of no entries"; `with_max_bytes(0)` too (rustdoc).
#[test]
fn invalid_settings_are_errors_when_built() {
    assert!(layer().with_ttl(Duration::ZERO).is_err());
    assert!(layer().with_ttl(Duration::from_nanos(1)).is_ok());
    assert!(layer().with_lease(Duration::from_micros(999)).is_err());
    assert!(layer().with_lease(Duration::ZERO).is_err());
    assert!(layer().with_lease(ms(1)).is_ok());
    assert!(layer().with_lease(Duration::MAX).is_ok());
    assert!(layer().with_ttl(Duration::MAX).is_ok());
    assert!(MemoryStore::new(0).is_err());
    assert!(MemoryStore::new(1).is_ok());
    assert!(MemoryStore::default().with_max_bytes(0).is_err());
    let e = MemoryStore::new(0).unwrap_err();
    assert!(!e.to_string().is_empty(), "the error says something: {e:?}");
}

/// The guide prints the in-flight conflict byte for byte.
#[tokio::test]
async fn the_in_flight_conflict_is_the_guides_problem_json() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = orders(
        layer(),
        runs.clone(),
        ms(200),
        Bytes::from_static(b"ok"),
        StatusCode::CREATED,
    );
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_req("k-flight")).await }
    });
    tokio::time::sleep(ms(50)).await;
    let (s, h, b) = send(&app, post_req("k-flight")).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(h["retry-after"], "1");
    let got: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let guide: serde_json::Value = serde_json::from_str(
        r#"{"type":"https://example.invalid/sturdy/problems/idempotency-key-in-flight","title":"A request is outstanding for this Idempotency-Key","status":409,"detail":"the first request with this key is still running; retry after a while with the same key"}"#,
    )
    .unwrap();
    assert_eq!(got, guide);
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    // Every problem type lives under the guide's prefix.
    for t in [
        problem::MISSING_KEY,
        problem::INVALID_KEY,
        problem::IN_FLIGHT,
        problem::KEY_REUSED,
        problem::BODY_TOO_LARGE,
        problem::STORE_UNAVAILABLE,
        problem::RESPONSE_TOO_LARGE,
        problem::INTERRUPTED,
    ] {
        assert!(
            t.starts_with("https://example.invalid/sturdy/problems/"),
            "{t}"
        );
    }
}

/// "store unreachable, or full of running requests | 503, `Retry-After: 1`,
/// `…/idempotency-store-unavailable`; the handler does not run"
#[tokio::test]
async fn a_store_full_of_running_requests_answers_503_and_the_handler_does_not_run() {
    let runs = Arc::new(AtomicUsize::new(0));
    let l = IdempotencyLayer::new(MemoryStore::new(1).unwrap(), ByCredentials::default());
    let app = orders(
        l,
        runs.clone(),
        ms(300),
        Bytes::from_static(b"ok"),
        StatusCode::CREATED,
    );
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_req("k-one")).await }
    });
    tokio::time::sleep(ms(50)).await;
    let (s, h, b) = send(&app, post_req("k-two")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h["retry-after"], "1");
    assert_eq!(problem_type(&b), problem::STORE_UNAVAILABLE);
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the refused request never ran"
    );
}

/// "body over the limit (1 MiB, `with_body_limit`) | 413, `…/request-body-too-large`": the
/// limit itself is accepted.
#[tokio::test]
async fn a_body_over_the_limit_is_413_and_the_limit_itself_passes() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple(layer().with_body_limit(10), runs.clone());
    let (s, _, _) = send(
        &app,
        req(Method::POST, "/orders", Some("k-10"), "0123456789"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, h, b) = send(
        &app,
        req(Method::POST, "/orders", Some("k-11"), "0123456789a"),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(problem_type(&b), problem::BODY_TOO_LARGE);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "`ByCredentials::default()` reads ... `X-Access-Token` ...; two requests share a key space
/// only when all of them are equal", and ".with_cookies(["session_id"]) reads only the named
/// cookies" while the whole `Cookie` header is one credential by default.
#[tokio::test]
async fn scopes_follow_the_credential_headers_and_the_named_cookies() {
    let with = |name: &'static str, value: &'static str| {
        Request::post("/orders")
            .header(name, value)
            .header("idempotency-key", "k-scope")
            .body(Body::from("{}"))
            .unwrap()
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple(layer(), runs.clone());
    send(&app, with("x-access-token", "alice")).await;
    let (_, h, _) = send(&app, with("x-access-token", "bob")).await;
    assert!(h.get("idempotent-replayed").is_none(), "another client");
    let (_, h, _) = send(&app, with("x-access-token", "alice")).await;
    assert_eq!(h["idempotent-replayed"], "true");
    send(&app, with("cookie", "session_id=s1; _ga=1")).await;
    let (_, h, _) = send(&app, with("cookie", "session_id=s1; _ga=2")).await;
    assert!(
        h.get("idempotent-replayed").is_none(),
        "the whole Cookie header is one credential by default"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 4);

    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple(
        IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default().with_cookies(["session_id"]),
        ),
        runs.clone(),
    );
    send(&app, with("cookie", "session_id=s1; _ga=1")).await;
    let (_, h, _) = send(&app, with("cookie", "_ga=2; session_id=s1")).await;
    assert_eq!(h["idempotent-replayed"], "true", "only session_id counts");
    let (_, h, _) = send(&app, with("cookie", "session_id=s2; _ga=1")).await;
    assert!(h.get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // `ByCredentials::headers([..])` reads only the headers named.
    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple(
        IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::headers([HeaderName::from_static("x-customer")]),
        ),
        runs.clone(),
    );
    send(&app, with("x-customer", "c1")).await;
    let mut r = with("x-customer", "c1");
    r.headers_mut()
        .insert("authorization", "Bearer other".parse().unwrap());
    let (_, h, _) = send(&app, r).await;
    assert_eq!(
        h["idempotent-replayed"], "true",
        "authorization is not read"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `on_event`: "every request answered with a stored response (`IdempotentReplayed`) and every
/// request refused for its key: 409 in flight, 422 reused, 400 missing or invalid
/// (`IdempotencyRefused`)".
#[tokio::test]
async fn the_event_hook_sees_replays_and_refusals_with_their_status() {
    let seen = Arc::new(Mutex::new(Vec::<(String, u16)>::new()));
    let log = seen.clone();
    let l = layer().with_require_key(true).on_event(move |e| {
        let entry = match e {
            Event::IdempotentReplayed { status, .. } => ("replayed".to_owned(), status.as_u16()),
            Event::IdempotencyRefused { status, .. } => ("refused".to_owned(), status.as_u16()),
            other => (format!("{other:?}"), 0),
        };
        log.lock().unwrap().push(entry);
    });
    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple(l, runs);
    send(&app, post_req("k-ev")).await;
    send(&app, post_req("k-ev")).await;
    send(&app, req(Method::POST, "/orders?x=1", Some("k-ev"), "{}")).await;
    send(&app, req(Method::POST, "/orders", None, "{}")).await;
    send(&app, post_req("bad key")).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("replayed".to_owned(), 201),
            ("refused".to_owned(), 422),
            ("refused".to_owned(), 400),
            ("refused".to_owned(), 400),
        ]
    );
}

/// Failure table, "response over the response limit (1 MiB) | the handler ran; a 500 marker is
/// stored in its place | 500 `…/idempotency-response-too-large`, also on every retry; the
/// handler is not run again".
#[tokio::test]
async fn row13_a_response_over_the_limit_is_500_also_on_every_retry_and_runs_once() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = orders(
        layer().with_response_limit(10),
        runs.clone(),
        Duration::ZERO,
        Bytes::from_static(b"0123456789abcdef"),
        StatusCode::CREATED,
    );
    let (s, _, b) = send(&app, post_req("k-big")).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{b:?}");
    assert_eq!(problem_type(&b), problem::RESPONSE_TOO_LARGE);
    for _ in 0..2 {
        let (s, _, b) = send(&app, post_req("k-big")).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(problem_type(&b), problem::RESPONSE_TOO_LARGE);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // A response exactly at the limit is stored.
    let app = orders(
        layer().with_response_limit(10),
        runs.clone(),
        Duration::ZERO,
        Bytes::from_static(b"0123456789"),
        StatusCode::CREATED,
    );
    send(&app, post_req("k-10")).await;
    let (s, h, b) = send(&app, post_req("k-10")).await;
    assert_eq!((s, b.as_ref()), (StatusCode::CREATED, &b"0123456789"[..]));
    assert_eq!(h["idempotent-replayed"], "true");
}

/// Failure table, "response the store cannot keep (over a `MemoryStore`'s byte bound) | the
/// handler ran; a 500 marker is stored in its place | the response to the first client; 500
/// `…/idempotency-response-too-large` on every retry; the handler is not run again".
#[tokio::test]
async fn row14_a_response_the_memory_store_cannot_keep_reaches_the_first_client_only() {
    let runs = Arc::new(AtomicUsize::new(0));
    let store = MemoryStore::default().with_max_bytes(4 * 1024).unwrap();
    let big = Bytes::from(vec![b'x'; 8 * 1024]);
    let app = orders(
        IdempotencyLayer::new(store, ByCredentials::default()),
        runs.clone(),
        Duration::ZERO,
        big.clone(),
        StatusCode::CREATED,
    );
    let (s, _, b) = send(&app, post_req("k-huge")).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(b, big, "the first client gets the response");
    for _ in 0..2 {
        let (s, _, b) = send(&app, post_req("k-huge")).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(problem_type(&b), problem::RESPONSE_TOO_LARGE);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Failure table, "connection dropped after the handler committed | ... its response is stored
/// when the handler returns | a transport error; a retry with the same key gets 409 while the
/// handler still runs, then the stored response". Over a real hyper server.
#[tokio::test]
async fn row3_a_dropped_connection_still_stores_the_response_over_the_wire() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = orders(
        layer(),
        runs.clone(),
        ms(300),
        Bytes::from_static(b"order o-1"),
        StatusCode::CREATED,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let client = reqwest::Client::new();
    let post = || {
        client
            .post(format!("http://{addr}/orders"))
            .header("authorization", "Bearer client-1")
            .header("idempotency-key", "k-wire")
            .body("{}")
    };
    // The first client gives up (its connection is dropped) while the handler runs.
    let gone = post().timeout(ms(100)).send().await;
    assert!(gone.is_err(), "{gone:?}");
    let again = post().send().await.unwrap();
    assert_eq!(again.status(), 409, "the handler still runs");
    assert_eq!(again.headers()["retry-after"], "1");
    tokio::time::sleep(ms(400)).await;
    let done = post().send().await.unwrap();
    assert_eq!(done.status(), 201);
    assert_eq!(done.headers()["idempotent-replayed"], "true");
    assert_eq!(done.text().await.unwrap(), "order o-1");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

fn redis_url() -> String {
    std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".to_owned())
}

/// Failure table, "worker crash (the process dies mid-handler) | the lock is no longer renewed
/// and expires at the end of its lease | with a shared store (Redis), retries get 409 until the
/// lease ends; then the next retry runs the handler". The crashed process is a runtime of its
/// own, shut down mid-handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row6_a_crashed_worker_holds_its_redis_key_until_the_lease_ends() {
    let prefix = format!("words8-crash-{}", uuid_like());
    let lease = ms(300);
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (p, url) = (prefix.clone(), redis_url());
    let crashed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let store = sturdy::redis::RedisIdempotencyStore::connect(&url)
                .await
                .unwrap()
                .with_prefix(p);
            let l = IdempotencyLayer::new(store, ByCredentials::default())
                .with_lease(lease)
                .unwrap();
            let app = Router::new()
                .route(
                    "/orders",
                    post(move || {
                        let tx = started_tx.clone();
                        async move {
                            tx.send(()).unwrap();
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            StatusCode::CREATED
                        }
                    }),
                )
                .layer(l);
            tokio::spawn(app.oneshot(post_req("k-crash")));
            tokio::time::sleep(ms(150)).await; // renewed at least once
        });
        // The process dies: the runtime and the handler's task with it.
        rt.shutdown_background();
    });
    started_rx.recv_timeout(Duration::from_secs(2)).unwrap();
    crashed.join().unwrap();

    let store = sturdy::redis::RedisIdempotencyStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(prefix);
    let runs = Arc::new(AtomicUsize::new(0));
    let l = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(lease)
        .unwrap();
    let app = simple_any(l, runs.clone());
    let (s, _, b) = send(&app, post_req("k-crash")).await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "the crashed run still holds the key"
    );
    assert_eq!(problem_type(&b), problem::IN_FLIGHT);
    let t0 = tokio::time::Instant::now();
    let status = loop {
        let (s, _, _) = send(&app, post_req("k-crash")).await;
        if s != StatusCode::CONFLICT || t0.elapsed() > Duration::from_millis(1500) {
            break s;
        }
        tokio::time::sleep(ms(25)).await;
    };
    assert_eq!(
        status,
        StatusCode::CREATED,
        "after the lease the handler runs"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

fn simple_any<St: IdempotencyStore + Clone>(
    l: IdempotencyLayer<St>,
    runs: Arc<AtomicUsize>,
) -> Router {
    orders(
        l,
        runs,
        Duration::ZERO,
        Bytes::from_static(b"ok"),
        StatusCode::CREATED,
    )
}

fn uuid_like() -> String {
    let t = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{t:x}-{}", std::process::id())
}

/// Failure table, "the server shuts down mid-handler | the task is dropped with the runtime;
/// the key is held until its lease ends". A memory store shared with a runtime that shuts down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row15_a_server_shut_down_mid_handler_holds_the_key_until_the_lease_ends() {
    let store = MemoryStore::default();
    let lease = ms(300);
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let s2 = store.clone();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = IdempotencyLayer::new(s2, ByCredentials::default())
                .with_lease(lease)
                .unwrap();
            let app = Router::new()
                .route(
                    "/orders",
                    post(move || {
                        let tx = started_tx.clone();
                        async move {
                            tx.send(()).unwrap();
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            StatusCode::CREATED
                        }
                    }),
                )
                .layer(l);
            tokio::spawn(app.oneshot(post_req("k-down")));
            tokio::time::sleep(ms(20)).await;
        });
        rt.shutdown_background();
    });
    started_rx.recv_timeout(Duration::from_secs(2)).unwrap();
    server.join().unwrap();

    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple_any(
        IdempotencyLayer::new(store, ByCredentials::default())
            .with_lease(lease)
            .unwrap(),
        runs.clone(),
    );
    let (s, _, _) = send(&app, post_req("k-down")).await;
    assert_eq!(s, StatusCode::CONFLICT, "held after the shutdown");
    tokio::time::sleep(ms(450)).await;
    let (s, _, _) = send(&app, post_req("k-down")).await;
    assert_eq!(s, StatusCode::CREATED, "free once the lease ended");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// One RESP command over a fresh connection to the test Redis, answered as raw text.
async fn redis_raw(args: &[&str]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = redis_url();
    let hostport = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let mut s = tokio::net::TcpStream::connect(hostport).await.unwrap();
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(cmd.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(ms(100), s.read(&mut buf))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// "The scope goes into the store only as a SHA-256 hash, never as the credential", and the
/// Redis key layout `<prefix>:<scope hash>:<idempotency key>` of sturdy-redis's rustdoc.
#[tokio::test]
async fn the_redis_store_holds_a_hash_of_the_scope_never_the_credential() {
    let prefix = format!("words8-scope-{}", uuid_like());
    let store = sturdy::redis::RedisIdempotencyStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple_any(IdempotencyLayer::new(store, ByCredentials::default()), runs);
    let r = Request::post("/orders")
        .header("authorization", "Bearer SUPERSECRET-token-42")
        .header("idempotency-key", "k-secret")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(send(&app, r).await.0, StatusCode::CREATED);
    let keys = redis_raw(&["KEYS", &format!("{prefix}*")]).await;
    assert!(!keys.contains("SUPERSECRET"), "{keys}");
    let key = keys
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no key under the prefix: {keys:?}"))
        .to_owned();
    let parts: Vec<&str> = key.rsplitn(2, ':').collect();
    assert_eq!(parts[0], "k-secret", "{key}");
    let scope = parts[1].trim_start_matches(&format!("{prefix}:"));
    assert!(
        scope.len() >= 32 && scope.chars().all(|c| c.is_ascii_hexdigit()),
        "the scope is a hash: {key}"
    );
    let value = redis_raw(&["DUMP", &key]).await;
    assert!(!value.contains("SUPERSECRET"), "{value}");
}

/// sturdy-redis: with `with_replication`, "`begin` ... fail[s] when fewer replicas confirm in
/// time: the layer then answers 503 without running the handler and releases the lock in the
/// background, so a retry runs at once". The test Redis has no replica.
#[tokio::test]
async fn a_begin_no_replica_confirmed_is_503_and_a_retry_runs_at_once() {
    let prefix = format!("words8-repl-{}", uuid_like());
    let replicated = sturdy::redis::RedisIdempotencyStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(prefix.clone())
        .with_replication(1, ms(50));
    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple_any(
        IdempotencyLayer::new(replicated, ByCredentials::default()),
        runs.clone(),
    );
    let (s, h, b) = send(&app, post_req("k-repl")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h["retry-after"], "1");
    assert_eq!(problem_type(&b), problem::STORE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the handler did not run");

    let plain = sturdy::redis::RedisIdempotencyStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(prefix);
    let app = simple_any(
        IdempotencyLayer::new(plain, ByCredentials::default()),
        runs.clone(),
    );
    let t0 = tokio::time::Instant::now();
    let status = loop {
        let (s, _, _) = send(&app, post_req("k-repl")).await;
        if s != StatusCode::CONFLICT || t0.elapsed() > ms(1500) {
            break s;
        }
        tokio::time::sleep(ms(10)).await;
    };
    assert_eq!(status, StatusCode::CREATED, "the lock was released");
    assert!(t0.elapsed() < ms(300), "at once: {:?}", t0.elapsed());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `MemoryStore`: "When the store is full, the completed response that expires first makes
/// room", and "an expired entry is purged as time passes, is not counted by `len()` and takes no
/// slot".
#[tokio::test]
async fn a_full_memory_store_evicts_the_completed_response_that_expires_first() {
    let store = MemoryStore::new(2).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = simple(
        IdempotencyLayer::new(store.clone(), ByCredentials::default()),
        runs.clone(),
    );
    send(&app, post_req("k-1")).await;
    send(&app, post_req("k-2")).await;
    assert_eq!(store.len(), 2);
    let (s, h, _) = send(&app, post_req("k-3")).await;
    assert_eq!(s, StatusCode::CREATED, "a completed response made room");
    assert!(h.get("idempotent-replayed").is_none());
    assert_eq!(store.len(), 2);
    let (_, h, _) = send(&app, post_req("k-1")).await;
    assert!(
        h.get("idempotent-replayed").is_none(),
        "k-1 expired first and went"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 4);

    // Expired entries take no slot and are not counted.
    let store = MemoryStore::new(1).unwrap();
    let app = simple(
        IdempotencyLayer::new(store.clone(), ByCredentials::default())
            .with_ttl(ms(50))
            .unwrap(),
        runs.clone(),
    );
    send(&app, post_req("k-a")).await;
    assert_eq!(store.len(), 1);
    let held = store.heap_bytes();
    assert!(held > 0);
    tokio::time::sleep(ms(80)).await;
    assert_eq!(store.len(), 0);
    assert_eq!(store.heap_bytes(), 0, "{}", store.heap_bytes());
    assert!(store.is_empty());
}

/// Polls a future to its end on this thread, outside any tokio runtime.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the future never finished"
        );
        std::thread::park_timeout(ms(5));
    }
}

/// "Without a tokio runtime (another executor), the handler runs in the request's future,
/// without lease renewal; a request dropped there keeps its key until its lease ends."
#[test]
// No runtime here to block: the test is another executor, sleeping on its own thread.
#[allow(clippy::disallowed_methods)]
fn without_a_tokio_runtime_the_handler_runs_in_place_and_a_dropped_request_holds_its_key() {
    use std::future::Future;
    use std::task::{Context, Waker};
    let runs = Arc::new(AtomicUsize::new(0));
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (r, h) = (runs.clone(), hold.clone());
    let handler = tower::service_fn(move |_req: Request<Body>| {
        let (r, h) = (r.clone(), h.clone());
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            if h.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Body::from("made"))
                    .unwrap(),
            )
        }
    });
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_lease(ms(100))
        .unwrap();
    let svc = tower::Layer::layer(&layer, handler);
    let call = |key: &str| {
        let svc = svc.clone();
        let req = post_req(key);
        async move {
            let res = svc.oneshot(req).await.unwrap();
            let status = res.status();
            let replayed = res.headers().contains_key("idempotent-replayed");
            (status, replayed)
        }
    };
    assert_eq!(block_on(call("k-plain")), (StatusCode::CREATED, false));
    assert_eq!(block_on(call("k-plain")), (StatusCode::CREATED, true));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A request whose handler never finishes, polled a few times, then dropped.
    hold.store(true, Ordering::SeqCst);
    {
        let mut fut = Box::pin(call("k-drop"));
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..20 {
            assert!(fut.as_mut().poll(&mut cx).is_pending());
            std::thread::sleep(ms(1));
        }
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the handler started in place"
    );
    hold.store(false, Ordering::SeqCst);
    assert_eq!(block_on(call("k-drop")).0, StatusCode::CONFLICT, "held");
    std::thread::sleep(ms(150));
    assert_eq!(
        block_on(call("k-drop")),
        (StatusCode::CREATED, false),
        "free after the lease"
    );
}

/// problem.rs: "`RESPONSE_FAILED` 500: the handler's response body failed while it was read;
/// the key was released."
#[tokio::test]
async fn a_response_body_that_fails_is_500_response_failed_and_the_key_is_released() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                        Ok(Bytes::from_static(b"part")),
                        Err(std::io::Error::other("the body broke")),
                    ];
                    Response::new(Body::from_stream(futures_util::stream::iter(chunks)))
                }
            }),
        )
        .layer(layer());
    let (s, h, b) = send(&app, post_req("k-broken")).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{b:?}");
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(problem_type(&b), problem::RESPONSE_FAILED);
    let (s, _, _) = send(&app, post_req("k-broken")).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "released: the retry ran the handler again"
    );
}

/// `StoredResponse::to_json`: "lossless for any bytes": every byte value in a header value and
/// in the body, and an empty response, come back as they were.
#[test]
fn stored_responses_round_trip_through_json_for_any_bytes() {
    use sturdy::idempotency::server::StoredResponse;
    let all: Vec<u8> = (0..=255u8).collect();
    let cases = [
        StoredResponse {
            status: 201,
            headers: vec![
                ("x-bytes".to_owned(), all.clone()),
                ("x-empty".to_owned(), Vec::new()),
                ("x-bytes".to_owned(), b"\"\\/\n".to_vec()),
            ],
            body: Bytes::from(all.repeat(3)),
        },
        StoredResponse {
            status: 599,
            headers: Vec::new(),
            body: Bytes::new(),
        },
    ];
    for r in cases {
        let json = r.to_json();
        assert!(
            serde_json::from_slice::<serde_json::Value>(&json).is_ok(),
            "valid JSON"
        );
        assert_eq!(StoredResponse::from_json(&json), Some(r));
    }
    assert_eq!(StoredResponse::from_json(b"{not json"), None);
    assert_eq!(StoredResponse::from_json(b""), None);
}

/// Failure table, "client timeout mid-handler", with the Redis store: the dropped request's
/// handler runs to its end and stores its response; the retry gets 409 meanwhile, then the
/// stored response, and the handler ran once.
#[tokio::test]
async fn row2_with_redis_a_dropped_request_still_stores_its_response() {
    let store = sturdy::redis::RedisIdempotencyStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(format!("words8-row2-{}", uuid_like()));
    let runs = Arc::new(AtomicUsize::new(0));
    let app = orders(
        IdempotencyLayer::new(store, ByCredentials::default()),
        runs.clone(),
        ms(200),
        Bytes::from_static(b"order o-2"),
        StatusCode::CREATED,
    );
    let gone = tokio::time::timeout(ms(50), send(&app, post_req("k-gone"))).await;
    assert!(gone.is_err(), "the client gave up");
    let (s, h, _) = send(&app, post_req("k-gone")).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(h["retry-after"], "1");
    tokio::time::sleep(ms(300)).await;
    let (s, h, b) = send(&app, post_req("k-gone")).await;
    assert_eq!((s, b.as_ref()), (StatusCode::CREATED, &b"order o-2"[..]));
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
