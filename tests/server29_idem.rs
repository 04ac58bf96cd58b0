//! The server idempotency layer against its guide and rustdoc: real axum apps on loopback with
//! tower-http layers around it, clients that time out or hang up mid-handler, hostile keys, and
//! the problem responses and logs it produces.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use sturdy::idempotency::server::{problem, ByCredentials, IdempotencyLayer, MemoryStore};
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Counter {
    runs: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct S {
    c: Counter,
    delay: Duration,
}

async fn order(State(s): State<S>, body: String) -> Response<Body> {
    let n = s.c.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let now = s.c.running.fetch_add(1, Ordering::SeqCst) + 1;
    s.c.peak.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(s.delay).await;
    s.c.running.fetch_sub(1, Ordering::SeqCst);
    s.c.done.fetch_add(1, Ordering::SeqCst);
    Response::builder()
        .status(StatusCode::CREATED)
        .header("x-order-id", format!("o_{n}"))
        .body(Body::from(format!("order {n}: {body}")))
        .unwrap()
}

fn layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
}

fn app_with(delay: Duration, l: IdempotencyLayer<MemoryStore>) -> (Router, Counter) {
    let c = Counter::default();
    let app = Router::new()
        .route("/orders", post(order).patch(order).get(order))
        .layer(l)
        .with_state(S {
            c: c.clone(),
            delay,
        });
    (app, c)
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

fn client() -> HyperClient<HttpConnector, Full<Bytes>> {
    HyperClient::builder(TokioExecutor::new()).build_http()
}

struct Got {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Got {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
    fn problem(&self) -> String {
        self.json()["type"].as_str().unwrap_or("").to_string()
    }
}

async fn call(addr: SocketAddr, method: Method, path: &str, key: Option<&str>, body: &str) -> Got {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", "Bearer client-1");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    let res = client()
        .request(b.body(Full::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Got {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn local(app: &Router, req: Request<Body>) -> Got {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Got {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn keyed(
    key: impl TryInto<HeaderValue, Error = impl std::fmt::Debug>,
    body: &str,
) -> Request<Body> {
    Request::post("/orders")
        .header("authorization", "Bearer client-1")
        .header("idempotency-key", key.try_into().unwrap())
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn wait_done(c: &Counter, n: usize) {
    for _ in 0..200 {
        if c.done.load(Ordering::SeqCst) >= n {
            // Let the layer's task store the response.
            tokio::time::sleep(Duration::from_millis(30)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("handler never finished");
}

// ---- the guide's example and table ---------------------------------------------------------

#[tokio::test]
async fn guide_example_over_the_wire_replays_status_headers_and_body() {
    async fn create_order(body: String) -> (http::StatusCode, String) {
        (http::StatusCode::CREATED, body)
    }
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_require_key(true);
    let app: axum::Router = axum::Router::new()
        .route("/orders", axum::routing::post(create_order))
        .layer(layer);
    let addr = serve(app).await;
    let first = call(addr, Method::POST, "/orders", Some("k-guide"), "{\"a\":1}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body, "{\"a\":1}");
    let again = call(addr, Method::POST, "/orders", Some("k-guide"), "{\"a\":1}").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body, "{\"a\":1}");
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let none = call(addr, Method::POST, "/orders", None, "{}").await;
    assert_eq!(none.status, StatusCode::BAD_REQUEST);
    assert_eq!(none.problem(), problem::MISSING_KEY);
}

#[tokio::test]
async fn replay_keeps_handler_headers() {
    let (app, c) = app_with(Duration::ZERO, layer());
    let addr = serve(app).await;
    let first = call(addr, Method::POST, "/orders", Some("k-h"), "x").await;
    let again = call(addr, Method::POST, "/orders", Some("k-h"), "x").await;
    assert_eq!(first.headers["x-order-id"], again.headers["x-order-id"]);
    assert_eq!(first.body, again.body);
    assert!(again.headers.contains_key("date"), "the server's own Date");
    assert_eq!(
        again.headers["content-length"],
        first.body.len().to_string()
    );
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn repeat_while_running_is_409_problem_with_retry_after_1() {
    let (app, c) = app_with(Duration::from_millis(300), layer());
    let addr = serve(app).await;
    let first =
        tokio::spawn(async move { call(addr, Method::POST, "/orders", Some("k-409"), "x").await });
    tokio::time::sleep(Duration::from_millis(80)).await;
    let second = call(addr, Method::POST, "/orders", Some("k-409"), "x").await;
    assert_eq!(second.status, StatusCode::CONFLICT);
    assert_eq!(second.headers["retry-after"], "1");
    assert_eq!(second.headers["content-type"], "application/problem+json");
    let j = second.json();
    assert_eq!(j["type"], problem::IN_FLIGHT);
    assert_eq!(j["status"], 409);
    assert_eq!(
        j["title"],
        "A request is outstanding for this Idempotency-Key"
    );
    assert_eq!(
        j["detail"],
        "the first request with this key is still running; retry after a while with the same key"
    );
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn same_key_other_body_method_path_or_query_is_422() {
    let c = Counter::default();
    let app = Router::new()
        .route("/orders", post(order).patch(order))
        .route("/other", post(order))
        .layer(layer())
        .with_state(S {
            c: c.clone(),
            delay: Duration::ZERO,
        });
    let addr = serve(app).await;
    assert_eq!(
        call(addr, Method::POST, "/orders?a=1&b=2", Some("k-r"), "x")
            .await
            .status,
        StatusCode::CREATED
    );
    for (m, p, b) in [
        (Method::POST, "/orders?a=1&b=2", "y"),
        (Method::PATCH, "/orders?a=1&b=2", "x"),
        (Method::POST, "/other?a=1&b=2", "x"),
        (Method::POST, "/orders?b=2&a=1", "x"),
        (Method::POST, "/orders", "x"),
    ] {
        let got = call(addr, m.clone(), p, Some("k-r"), b).await;
        assert_eq!(got.status, StatusCode::UNPROCESSABLE_ENTITY, "{m} {p} {b}");
        assert_eq!(got.problem(), problem::KEY_REUSED);
    }
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn hostile_keys_are_400_invalid_key() {
    let (app, c) = app_with(Duration::ZERO, layer());
    let long = "k".repeat(10 * 1024);
    let cases: Vec<(&str, HeaderValue)> = vec![
        ("empty", HeaderValue::from_static("")),
        ("10 KB", HeaderValue::from_str(&long).unwrap()),
        ("256", HeaderValue::from_str(&"a".repeat(256)).unwrap()),
        (
            "non-ASCII",
            HeaderValue::from_bytes("clé-ü".as_bytes()).unwrap(),
        ),
        ("inner space", HeaderValue::from_static("a b")),
        ("tab", HeaderValue::from_static("a\tb")),
    ];
    for (what, v) in cases {
        let got = local(&app, keyed(v, "x")).await;
        assert_eq!(got.status, StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(got.problem(), problem::INVALID_KEY, "{what}");
        assert_eq!(got.headers["content-type"], "application/problem+json");
    }
    assert_eq!(c.runs.load(Ordering::SeqCst), 0);
    let got = local(&app, keyed("a".repeat(255).as_str(), "x")).await;
    assert_eq!(got.status, StatusCode::CREATED, "255 visible characters");
}

#[tokio::test]
async fn two_different_key_lines_are_400_identical_lines_are_one_key() {
    let (app, c) = app_with(Duration::ZERO, layer());
    let req = |a: &str, b: &str| {
        Request::post("/orders")
            .header("idempotency-key", a)
            .header("idempotency-key", b)
            .body(Body::from("x"))
            .unwrap()
    };
    let got = local(&app, req("k-a", "k-b")).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.problem(), problem::INVALID_KEY);
    let got = local(&app, req("k", "\"k\"")).await;
    assert_eq!(
        got.status,
        StatusCode::BAD_REQUEST,
        "k and \"k\" on two lines"
    );
    assert_eq!(
        local(&app, req("k-same", "k-same")).await.status,
        StatusCode::CREATED
    );
    let got = local(&app, req("k-same", "k-same")).await;
    assert_eq!(got.headers["idempotent-replayed"], "true");
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn structured_field_string_and_bare_key_name_one_key() {
    let (app, c) = app_with(Duration::ZERO, layer());
    assert_eq!(
        local(&app, keyed("\"k-sf\"", "x")).await.status,
        StatusCode::CREATED
    );
    let got = local(&app, keyed("k-sf", "x")).await;
    assert_eq!(got.status, StatusCode::CREATED);
    assert_eq!(
        got.headers
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true"),
        "the module docs say a key may be sent bare or as a structured-field string"
    );
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn get_passes_through_and_missing_key_passes_when_not_required() {
    let (app, c) = app_with(Duration::ZERO, layer());
    let get = || {
        Request::get("/orders")
            .header("idempotency-key", "k-get")
            .body(Body::empty())
            .unwrap()
    };
    assert!(local(&app, get())
        .await
        .headers
        .get("idempotent-replayed")
        .is_none());
    assert!(local(&app, get())
        .await
        .headers
        .get("idempotent-replayed")
        .is_none());
    let nokey = || Request::post("/orders").body(Body::from("x")).unwrap();
    local(&app, nokey()).await;
    local(&app, nokey()).await;
    assert_eq!(c.runs.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn with_methods_makes_put_idempotent_and_post_pass_through() {
    let c = Counter::default();
    let app = Router::new()
        .route("/orders", post(order).put(order))
        .layer(layer().with_methods([Method::PUT]))
        .with_state(S {
            c: c.clone(),
            delay: Duration::ZERO,
        });
    let put = || {
        Request::put("/orders")
            .header("idempotency-key", "k-put")
            .body(Body::from("x"))
            .unwrap()
    };
    local(&app, put()).await;
    assert_eq!(
        local(&app, put()).await.headers["idempotent-replayed"],
        "true"
    );
    local(&app, keyed("k-post", "x")).await;
    local(&app, keyed("k-post", "x")).await;
    assert_eq!(c.runs.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn own_body_limit_is_413_problem() {
    let (app, c) = app_with(Duration::ZERO, layer().with_body_limit(10));
    let got = local(&app, keyed("k-big", "01234567890")).await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(got.problem(), problem::BODY_TOO_LARGE);
    assert_eq!(
        local(&app, keyed("k-ok", "0123456789")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn default_body_limit_is_one_mib() {
    let (app, _c) = status_app(201, layer());
    let at = "a".repeat(1024 * 1024);
    assert_eq!(
        local(&app, keyed("k-1m", &at)).await.status,
        StatusCode::CREATED
    );
    let over = "a".repeat(1024 * 1024 + 1);
    assert_eq!(
        local(&app, keyed("k-1m1", &over)).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
}

// ---- what is stored -------------------------------------------------------------------------

async fn status_handler(State(s): State<(Counter, u16)>) -> Response<Body> {
    s.0.runs.fetch_add(1, Ordering::SeqCst);
    Response::builder()
        .status(s.1)
        .body(Body::from("r"))
        .unwrap()
}

fn status_app(status: u16, l: IdempotencyLayer<MemoryStore>) -> (Router, Counter) {
    let c = Counter::default();
    let app = Router::new()
        .route("/orders", post(status_handler))
        .layer(l)
        .with_state((c.clone(), status));
    (app, c)
}

#[tokio::test]
async fn server_errors_and_408_425_429_are_not_stored() {
    for status in [500, 502, 503, 408, 425, 429] {
        let (app, c) = status_app(status, layer());
        local(&app, keyed("k", "x")).await;
        let again = local(&app, keyed("k", "x")).await;
        assert_eq!(again.status.as_u16(), status);
        assert_eq!(c.runs.load(Ordering::SeqCst), 2, "{status} ran once only");
    }
}

#[tokio::test]
async fn store_server_errors_true_stores_500_but_never_429() {
    let (app, c) = status_app(500, layer().with_store_server_errors(true));
    local(&app, keyed("k", "x")).await;
    assert_eq!(
        local(&app, keyed("k", "x")).await.headers["idempotent-replayed"],
        "true"
    );
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
    let (app, c) = status_app(429, layer().with_store_server_errors(true));
    local(&app, keyed("k", "x")).await;
    local(&app, keyed("k", "x")).await;
    assert_eq!(c.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn client_errors_are_stored() {
    let (app, c) = status_app(404, layer());
    local(&app, keyed("k", "x")).await;
    let again = local(&app, keyed("k", "x")).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn response_over_the_limit_is_a_500_marker_and_the_handler_runs_once() {
    let (app, c) = app_with(Duration::ZERO, layer().with_response_limit(8));
    let first = local(&app, keyed("k-large", "a long body")).await;
    let again = local(&app, keyed("k-large", "a long body")).await;
    assert_eq!(again.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(again.problem(), problem::RESPONSE_TOO_LARGE);
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
    assert!(
        first.status == StatusCode::INTERNAL_SERVER_ERROR || first.status == StatusCode::CREATED,
        "{}",
        first.status
    );
}

#[tokio::test]
async fn scopes_separate_clients_with_the_same_key() {
    let (app, c) = app_with(Duration::ZERO, layer());
    let req = |auth: &str| {
        Request::post("/orders")
            .header("authorization", auth)
            .header("idempotency-key", "k-shared")
            .body(Body::from("x"))
            .unwrap()
    };
    let a = local(&app, req("Bearer a")).await;
    let b = local(&app, req("Bearer b")).await;
    assert_ne!(a.body, b.body);
    assert!(b.headers.get("idempotent-replayed").is_none());
    let a2 = local(&app, req("Bearer a")).await;
    assert_eq!(a2.body, a.body);
    assert_eq!(c.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn store_full_of_running_requests_is_503_and_the_handler_does_not_run() {
    let store = MemoryStore::new(1).unwrap();
    let l = IdempotencyLayer::new(store, ByCredentials::default());
    let (app, c) = app_with(Duration::from_millis(300), l);
    let addr = serve(app).await;
    let first =
        tokio::spawn(async move { call(addr, Method::POST, "/orders", Some("k-1"), "x").await });
    tokio::time::sleep(Duration::from_millis(80)).await;
    let second = call(addr, Method::POST, "/orders", Some("k-2"), "x").await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.headers["retry-after"], "1");
    assert_eq!(second.problem(), problem::STORE_UNAVAILABLE);
    first.await.unwrap();
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[test]
fn invalid_settings_are_errors_when_built_and_say_which() {
    let e = layer().with_ttl(Duration::ZERO).unwrap_err();
    assert!(e.to_string().to_lowercase().contains("ttl"), "{e}");
    let e = layer().with_lease(Duration::ZERO).unwrap_err();
    assert!(e.to_string().to_lowercase().contains("lease"), "{e}");
    assert!(layer().with_lease(Duration::from_micros(999)).is_err());
    assert!(layer().with_lease(Duration::from_millis(1)).is_ok());
    assert!(MemoryStore::new(0).is_err());
    assert_eq!(MemoryStore::DEFAULT_MAX_ENTRIES, 100_000);
    assert_eq!(MemoryStore::DEFAULT_MAX_BYTES, 64 * 1024 * 1024);
}

#[test]
fn problem_types_are_under_the_documented_prefix() {
    for t in [
        problem::MISSING_KEY,
        problem::INVALID_KEY,
        problem::IN_FLIGHT,
        problem::KEY_REUSED,
        problem::BODY_TOO_LARGE,
        problem::STORE_UNAVAILABLE,
        problem::RESPONSE_TOO_LARGE,
    ] {
        assert!(
            t.starts_with("https://example.invalid/sturdy/problems/"),
            "{t}"
        );
    }
    assert!(problem::IN_FLIGHT.ends_with("/idempotency-key-in-flight"));
    assert!(problem::KEY_REUSED.ends_with("/idempotency-key-reused"));
    assert!(problem::STORE_UNAVAILABLE.ends_with("/idempotency-store-unavailable"));
}

// ---- cancellation -----------------------------------------------------------------------------

#[tokio::test]
async fn client_timeout_mid_handler_then_409_then_the_stored_response() {
    let (app, c) = app_with(Duration::from_millis(300), layer());
    let addr = serve(app).await;
    let cut = tokio::time::timeout(
        Duration::from_millis(60),
        call(addr, Method::POST, "/orders", Some("k-cut"), "x"),
    )
    .await;
    assert!(cut.is_err());
    let retry = call(addr, Method::POST, "/orders", Some("k-cut"), "x").await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(retry.headers["retry-after"], "1");
    assert_eq!(retry.problem(), problem::IN_FLIGHT);
    wait_done(&c, 1).await;
    let after = call(addr, Method::POST, "/orders", Some("k-cut"), "x").await;
    assert_eq!(after.status, StatusCode::CREATED);
    assert_eq!(after.headers["idempotent-replayed"], "true");
    assert_eq!(after.body, "order 1: x");
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn connection_dropped_mid_handler_the_handler_finishes_and_is_stored() {
    let (app, c) = app_with(Duration::from_millis(200), layer());
    let addr = serve(app).await;
    let task =
        tokio::spawn(async move { call(addr, Method::POST, "/orders", Some("k-drop"), "x").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    task.abort();
    let _ = task.await;
    wait_done(&c, 1).await;
    let after = call(addr, Method::POST, "/orders", Some("k-drop"), "x").await;
    assert_eq!(after.status, StatusCode::CREATED);
    assert_eq!(after.headers["idempotent-replayed"], "true");
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        c.done.load(Ordering::SeqCst),
        1,
        "the handler ran to its end"
    );
}

#[tokio::test]
async fn timeout_layer_outside_gives_408_but_the_handler_runs_once_and_is_replayed() {
    let c = Counter::default();
    let app = Router::new()
        .route("/orders", post(order))
        .layer(layer())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(50),
        ))
        .with_state(S {
            c: c.clone(),
            delay: Duration::from_millis(250),
        });
    let addr = serve(app).await;
    let first = call(addr, Method::POST, "/orders", Some("k-tl"), "x").await;
    assert_eq!(first.status, StatusCode::REQUEST_TIMEOUT);
    let second = call(addr, Method::POST, "/orders", Some("k-tl"), "x").await;
    assert_eq!(second.status, StatusCode::CONFLICT);
    wait_done(&c, 1).await;
    let third = call(addr, Method::POST, "/orders", Some("k-tl"), "x").await;
    assert_eq!(third.status, StatusCode::CREATED);
    assert_eq!(third.headers["idempotent-replayed"], "true");
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn timeout_inside_as_route_layer_is_a_408_that_is_not_stored() {
    let c = Counter::default();
    let app = Router::new()
        .route("/orders", post(order))
        .route_layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(30),
        ))
        .layer(layer())
        .with_state(S {
            c: c.clone(),
            delay: Duration::from_millis(100),
        });
    let addr = serve(app).await;
    assert_eq!(
        call(addr, Method::POST, "/orders", Some("k-in"), "x")
            .await
            .status,
        StatusCode::REQUEST_TIMEOUT
    );
    assert_eq!(
        call(addr, Method::POST, "/orders", Some("k-in"), "x")
            .await
            .status,
        StatusCode::REQUEST_TIMEOUT
    );
    assert_eq!(
        c.runs.load(Ordering::SeqCst),
        2,
        "408 says not processed: run again"
    );
}

#[tokio::test]
async fn request_body_limit_outside_is_413_for_length_and_chunked() {
    let (inner, c) = app_with(Duration::ZERO, layer());
    let app = inner.layer(tower_http::limit::RequestBodyLimitLayer::new(16));
    let got = local(&app, keyed("k-rbl", &"a".repeat(100))).await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
    let stream = futures_util::stream::iter(
        (0..10).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(b"0123456789"))),
    );
    let req = Request::post("/orders")
        .header("idempotency-key", "k-rbl2")
        .body(Body::from_stream(stream))
        .unwrap();
    let got = local(&app, req).await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(c.runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn route_layer_leaves_unmatched_paths_alone_and_guards_matched_ones() {
    let c = Counter::default();
    let app = Router::new()
        .route("/orders", post(order))
        .route_layer(layer().with_require_key(true))
        .route("/free", post(order))
        .with_state(S {
            c: c.clone(),
            delay: Duration::ZERO,
        });
    let none = |p: &str| Request::post(p).body(Body::from("x")).unwrap();
    assert_eq!(
        local(&app, none("/orders")).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(local(&app, none("/free")).await.status, StatusCode::CREATED);
    assert_eq!(
        local(&app, none("/missing")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn nested_routers_sharing_a_store_keep_paths_apart() {
    let c = Counter::default();
    let store = MemoryStore::default();
    let st = S {
        c: c.clone(),
        delay: Duration::ZERO,
    };
    let mk = || {
        Router::new()
            .route("/orders", post(order))
            .layer(IdempotencyLayer::new(
                store.clone(),
                ByCredentials::default(),
            ))
            .with_state(st.clone())
    };
    let app: Router = Router::new().nest("/eu", mk()).nest("/us", mk());
    let req = |p: &str| {
        Request::post(p)
            .header("idempotency-key", "k-nest")
            .body(Body::from("x"))
            .unwrap()
    };
    assert_eq!(
        local(&app, req("/eu/orders")).await.status,
        StatusCode::CREATED
    );
    let us = local(&app, req("/us/orders")).await;
    assert_eq!(
        us.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "another path under the same key is 422 (guide); got {} replayed={:?}",
        us.status,
        us.headers.get("idempotent-replayed")
    );
}

#[tokio::test]
async fn layer_on_the_outer_router_sees_the_full_nested_path() {
    let c = Counter::default();
    let inner = Router::new().route("/orders", post(order));
    let app: Router = Router::new()
        .nest("/eu", inner.clone())
        .nest("/us", inner)
        .layer(layer())
        .with_state(S {
            c: c.clone(),
            delay: Duration::ZERO,
        });
    let req = |p: &str| {
        Request::post(p)
            .header("idempotency-key", "k-outer")
            .body(Body::from("x"))
            .unwrap()
    };
    assert_eq!(
        local(&app, req("/eu/orders")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        local(&app, req("/us/orders")).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
}

#[tokio::test]
async fn concurrency_limit_inside_counts_handlers_whose_client_left() {
    let c = Counter::default();
    let app = Router::new()
        .route("/orders", post(order))
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .layer(layer())
        .with_state(S {
            c: c.clone(),
            delay: Duration::from_millis(200),
        });
    let addr = serve(app).await;
    let cut = tokio::time::timeout(
        Duration::from_millis(40),
        call(addr, Method::POST, "/orders", Some("k-c1"), "x"),
    )
    .await;
    assert!(cut.is_err());
    let second = call(addr, Method::POST, "/orders", Some("k-c2"), "x").await;
    assert_eq!(second.status, StatusCode::CREATED);
    wait_done(&c, 2).await;
    assert_eq!(
        c.peak.load(Ordering::SeqCst),
        1,
        "the limit held for the abandoned handler"
    );
}

async fn boom() -> &'static str {
    panic!("handler exploded")
}

#[tokio::test]
async fn panic_is_a_500_under_catch_panic_and_the_key_is_released() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                r.fetch_add(1, Ordering::SeqCst);
                boom()
            }),
        )
        .layer(layer())
        .layer(tower_http::catch_panic::CatchPanicLayer::new());
    let addr = serve(app).await;
    for _ in 0..2 {
        let got = call(addr, Method::POST, "/orders", Some("k-panic"), "x").await;
        assert_eq!(got.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "a retry, even at once, runs again"
    );
}

#[tokio::test]
async fn graceful_shutdown_mid_handler_sends_and_stores_the_response() {
    let (app, c) = app_with(Duration::from_millis(200), layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let s2 = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { s2.notified().await })
            .await
            .unwrap();
    });
    let req =
        tokio::spawn(async move { call(addr, Method::POST, "/orders", Some("k-gs"), "x").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.notify_one();
    let got = req.await.unwrap();
    assert_eq!(got.status, StatusCode::CREATED);
    server.await.unwrap();
    assert_eq!(c.done.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn sturdy_client_rides_the_409_to_the_stored_response() {
    use sturdy::core::CallOptions;
    let (app, c) = app_with(Duration::from_millis(400), layer());
    let addr = serve(app).await;
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = sturdy::ClientBuilder::new()
        .with_attempt_timeout(Duration::from_millis(100))
        .build(http);
    let mut req = Request::post(format!("http://{addr}/orders"))
        .header("authorization", "Bearer client-1")
        .body(Full::from("x"))
        .unwrap();
    req.extensions_mut().insert(
        CallOptions::new()
            .with_idempotency_key("k-sturdy")
            .with_deadline(Duration::from_secs(10)),
    );
    let res = client.oneshot(req).await.expect("the stored response");
    assert_eq!(res.status(), StatusCode::CREATED);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"order 1: x");
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

// ---- words ------------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn logs_and_debug_never_show_the_credential() {
    let logs = Logs::default();
    let sink = logs.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = crate::logs13_common::set_default(sub);
    let (app, _c) = app_with(Duration::ZERO, layer());
    let req = |k: &str, b: &str| {
        Request::post("/orders")
            .header("authorization", "Bearer tok-SUPERSECRET-42")
            .header("cookie", "session_id=COOKIESECRET")
            .header("idempotency-key", k)
            .body(Body::from(b.to_string()))
            .unwrap()
    };
    local(&app, req("k-log", "a")).await;
    local(&app, req("k-log", "a")).await;
    local(&app, req("k-log", "b")).await;
    local(&app, req("", "b")).await;
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(!text.contains("SUPERSECRET"), "{text}");
    assert!(!text.contains("COOKIESECRET"), "{text}");
    let dbg = format!("{:?}", layer());
    assert!(!dbg.is_empty());
}

#[tokio::test]
async fn problem_bodies_name_their_cause() {
    let (app, _c) = app_with(
        Duration::ZERO,
        layer().with_require_key(true).with_body_limit(4),
    );
    let missing = local(
        &app,
        Request::post("/orders").body(Body::from("x")).unwrap(),
    )
    .await;
    let invalid = local(&app, keyed("", "x")).await;
    let big = local(&app, keyed("k", "xxxxxxx")).await;
    local(&app, keyed("k2", "x")).await;
    let reused = local(&app, keyed("k2", "y")).await;
    for (g, word) in [
        (&missing, "missing"),
        (&invalid, "invalid"),
        (&big, "large"),
        (&reused, "reused"),
    ] {
        let j = g.json();
        assert_eq!(j["status"], g.status.as_u16(), "{}", g.body);
        assert!(
            j["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{}",
            g.body
        );
        assert!(
            j["detail"].as_str().is_some_and(|t| !t.is_empty()),
            "{}",
            g.body
        );
        assert!(j["type"].as_str().unwrap().contains(word), "{}", g.body);
    }
}

#[tokio::test]
async fn state_and_get_routes_coexist_with_the_layer() {
    async fn count(State(s): State<S>) -> String {
        s.c.runs.load(Ordering::SeqCst).to_string()
    }
    let c = Counter::default();
    let app = Router::new()
        .route("/orders", post(order))
        .route("/count", get(count))
        .layer(layer())
        .with_state(S {
            c: c.clone(),
            delay: Duration::ZERO,
        });
    let addr = serve(app).await;
    call(addr, Method::POST, "/orders", Some("k-s"), "x").await;
    call(addr, Method::POST, "/orders", Some("k-s"), "x").await;
    assert_eq!(call(addr, Method::GET, "/count", None, "").await.body, "1");
}

// ---- more: time, scopes, concurrency ------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn ttl_expiry_lets_the_key_run_again() {
    let (app, c) = app_with(
        Duration::ZERO,
        layer().with_ttl(Duration::from_secs(2)).unwrap(),
    );
    local(&app, keyed("k-ttl", "x")).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        local(&app, keyed("k-ttl", "x")).await.headers["idempotent-replayed"],
        "true"
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    let got = local(&app, keyed("k-ttl", "x")).await;
    assert!(got.headers.get("idempotent-replayed").is_none());
    assert_eq!(c.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_handler_slower_than_its_lease_keeps_its_key() {
    let (app, c) = app_with(
        Duration::from_secs(10),
        layer().with_lease(Duration::from_millis(300)).unwrap(),
    );
    let a2 = app.clone();
    let first = tokio::spawn(async move { local(&a2, keyed("k-lease", "x")).await });
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let got = local(&app, keyed("k-lease", "x")).await;
        assert_eq!(got.status, StatusCode::CONFLICT, "the lock was renewed");
    }
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(
        local(&app, keyed("k-lease", "x")).await.headers["idempotent-replayed"],
        "true"
    );
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn ten_concurrent_identical_requests_run_the_handler_once() {
    let (app, c) = app_with(Duration::from_millis(200), layer());
    let addr = serve(app).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(tokio::spawn(async move {
            call(addr, Method::POST, "/orders", Some("k-storm"), "x")
                .await
                .status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CONFLICT)
            .count(),
        9,
        "{statuses:?}"
    );
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn other_body_while_the_first_runs_is_refused_and_does_not_run() {
    let (app, c) = app_with(Duration::from_millis(200), layer());
    let addr = serve(app).await;
    let first =
        tokio::spawn(async move { call(addr, Method::POST, "/orders", Some("k-race"), "x").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let other = call(addr, Method::POST, "/orders", Some("k-race"), "y").await;
    assert!(
        other.status == StatusCode::CONFLICT || other.status == StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        other.status
    );
    first.await.unwrap();
    assert_eq!(
        call(addr, Method::POST, "/orders", Some("k-race"), "y")
            .await
            .status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn anonymous_clients_share_one_scope() {
    let (app, c) = app_with(Duration::ZERO, layer());
    let req = || {
        Request::post("/orders")
            .header("idempotency-key", "k-anon")
            .body(Body::from("x"))
            .unwrap()
    };
    local(&app, req()).await;
    assert_eq!(
        local(&app, req()).await.headers["idempotent-replayed"],
        "true"
    );
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn every_default_credential_header_splits_scopes() {
    for h in [
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-auth-token",
        "x-access-token",
        "cookie",
    ] {
        let (app, c) = app_with(Duration::ZERO, layer());
        for v in ["one", "two"] {
            let req = Request::post("/orders")
                .header(h, v)
                .header("idempotency-key", "k-cred")
                .body(Body::from("x"))
                .unwrap();
            local(&app, req).await;
        }
        assert_eq!(c.runs.load(Ordering::SeqCst), 2, "{h}");
    }
}

#[tokio::test]
async fn with_cookies_ignores_a_changing_analytics_cookie() {
    let l = IdempotencyLayer::new(
        MemoryStore::default(),
        ByCredentials::default().with_cookies(["session_id"]),
    );
    let (app, c) = app_with(Duration::ZERO, l);
    let req = |cookie: &str| {
        Request::post("/orders")
            .header("cookie", cookie)
            .header("idempotency-key", "k-cookie")
            .body(Body::from("x"))
            .unwrap()
    };
    local(&app, req("session_id=s1; _ga=1")).await;
    assert_eq!(
        local(&app, req("_ga=2; session_id=s1")).await.headers["idempotent-replayed"],
        "true"
    );
    local(&app, req("session_id=s2; _ga=2")).await;
    assert_eq!(c.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_closure_scope_reads_a_tenant_header() {
    let l = IdempotencyLayer::new(MemoryStore::default(), |p: &http::request::Parts| {
        p.headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string()
    });
    let (app, c) = app_with(Duration::ZERO, l);
    for t in ["t1", "t2", "t1"] {
        let req = Request::post("/orders")
            .header("x-tenant", t)
            .header("idempotency-key", "k-tenant")
            .body(Body::from("x"))
            .unwrap();
        local(&app, req).await;
    }
    assert_eq!(c.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn custom_key_header() {
    let l = layer()
        .with_header(http::HeaderName::from_static("x-request-key"))
        .with_require_key(true);
    let (app, c) = app_with(Duration::ZERO, l);
    let req = || {
        Request::post("/orders")
            .header("x-request-key", "k-x")
            .body(Body::from("x"))
            .unwrap()
    };
    local(&app, req()).await;
    assert_eq!(
        local(&app, req()).await.headers["idempotent-replayed"],
        "true"
    );
    let old = local(&app, keyed("k-old", "x")).await;
    assert_eq!(
        old.status,
        StatusCode::BAD_REQUEST,
        "Idempotency-Key is not the header any more"
    );
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unreadable_body_is_a_400_problem_and_the_handler_does_not_run() {
    let (app, c) = app_with(Duration::ZERO, layer());
    let stream = futures_util::stream::iter(vec![
        Ok(Bytes::from_static(b"part")),
        Err(std::io::Error::other("client went away")),
    ]);
    let req = Request::post("/orders")
        .header("idempotency-key", "k-broken")
        .body(Body::from_stream(stream))
        .unwrap();
    let got = local(&app, req).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.problem(), problem::UNREADABLE_BODY);
    assert_eq!(c.runs.load(Ordering::SeqCst), 0);
    // The key is free for the real request.
    assert_eq!(
        local(&app, keyed("k-broken", "x")).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn on_event_reports_replays_and_refusals() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let l = layer().on_event(move |e| {
        use sturdy::core::events::Event;
        match e {
            Event::IdempotentReplayed { .. } => s2.lock().unwrap().push(200),
            Event::IdempotencyRefused { status, .. } => s2.lock().unwrap().push(status.as_u16()),
            _ => {}
        }
    });
    let (app, _c) = app_with(Duration::ZERO, l);
    local(&app, keyed("k-ev", "x")).await;
    local(&app, keyed("k-ev", "x")).await;
    local(&app, keyed("k-ev", "y")).await;
    local(&app, keyed("", "y")).await;
    assert_eq!(*seen.lock().unwrap(), vec![200, 422, 400]);
}

#[tokio::test]
async fn first_response_has_no_replayed_header_and_keeps_its_content_type() {
    async fn json_order() -> axum::Json<serde_json::Value> {
        axum::Json(serde_json::json!({"id": "o_1"}))
    }
    let app = Router::new()
        .route("/orders", post(json_order))
        .layer(layer());
    let first = local(&app, keyed("k-ct", "x")).await;
    assert!(first.headers.get("idempotent-replayed").is_none());
    let again = local(&app, keyed("k-ct", "x")).await;
    assert_eq!(again.headers["content-type"], "application/json");
    assert_eq!(again.body, first.body);
}

#[tokio::test]
async fn store_byte_bound_the_first_client_gets_its_response_retries_the_marker() {
    let store = MemoryStore::default().with_max_bytes(4 * 1024).unwrap();
    let l = IdempotencyLayer::new(store, ByCredentials::default());
    let (app, c) = app_with(Duration::ZERO, l);
    let big = "b".repeat(16 * 1024);
    let first = local(&app, keyed("k-bytes", &big)).await;
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the first client gets the response"
    );
    let again = local(&app, keyed("k-bytes", &big)).await;
    assert_eq!(again.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(again.problem(), problem::RESPONSE_TOO_LARGE);
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn response_over_the_limit_the_first_client_also_gets_the_500_marker() {
    let (app, c) = app_with(Duration::ZERO, layer().with_response_limit(8));
    let first = local(&app, keyed("k-large1", "a long body")).await;
    assert_eq!(
        first.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        first.body
    );
    assert_eq!(first.problem(), problem::RESPONSE_TOO_LARGE);
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn keys_differing_only_in_case_are_two_keys() {
    let (app, c) = app_with(Duration::ZERO, layer());
    local(&app, keyed("Key-1", "x")).await;
    let got = local(&app, keyed("key-1", "x")).await;
    assert!(got.headers.get("idempotent-replayed").is_none());
    assert_eq!(c.runs.load(Ordering::SeqCst), 2);
}
