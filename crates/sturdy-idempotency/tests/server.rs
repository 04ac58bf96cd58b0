//! The server layer in process: the conformance suite on the memory store, axum integration,
//! paused-time leases and executions, scopes, panics, bounds, readiness.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy_core::BoxError;
use sturdy_idempotency::server::{
    conformance, problem, Begin, BoxFuture, ByCredentials, Fingerprint, IdempotencyLayer,
    IdempotencyStore, LockToken, MemoryStore, StoredResponse,
};
use tower::{service_fn, Layer, Service, ServiceExt};

#[tokio::test]
async fn memory_store_passes_the_conformance_suite() {
    let store = MemoryStore::default();
    conformance::run(store.clone(), store).await;
}

/// An orders app: commits (counts the run), then takes `work`, then answers 201 `order <n>`.
/// The body `panic` panics.
fn app(layer: IdempotencyLayer<MemoryStore>, runs: Arc<AtomicU32>, work: Duration) -> Router {
    Router::new()
        .route(
            "/orders",
            post(move |body: String| {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    if body == "panic" {
                        panic!("handler bug");
                    }
                    tokio::time::sleep(work).await;
                    (StatusCode::CREATED, format!("order {n}"))
                }
            }),
        )
        .layer(layer)
}

fn layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()).with_require_key(true)
}

fn order(key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut b = Request::post("/orders");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::from(body)).unwrap()
}

async fn text(res: Response<Body>) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

async fn problem_of(res: Response<Body>) -> serde_json::Value {
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    serde_json::from_str(&text(res).await).unwrap()
}

#[tokio::test]
async fn axum_router_replays_and_rejects() {
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(layer(), runs.clone(), Duration::ZERO);
    let first = app.clone().oneshot(order(Some("k1"), "{}")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let again = app
        .clone()
        .oneshot(order(Some("\"k1\""), "{}"))
        .await
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(text(again).await, "order 1");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let missing = app.clone().oneshot(order(None, "{}")).await.unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    let p = problem_of(missing).await;
    assert_eq!(p["type"], problem::MISSING_KEY);
    assert_eq!(p["title"], "Idempotency-Key is missing");
    assert_eq!(p["status"], 400);

    let bad = app
        .clone()
        .oneshot(order(Some("has space"), "{}"))
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(problem_of(bad).await["type"], problem::INVALID_KEY);
    // GET passes through untouched.
    let get = app
        .oneshot(Request::get("/orders").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn under_nest_the_fingerprint_takes_the_path_the_client_sent() {
    // One layer (one store) on two nested routers: axum strips `/us` and `/eu`, so both
    // routes see `/orders`; the key's fingerprint must still tell them apart.
    let runs = Arc::new(AtomicU32::new(0));
    let layer = layer();
    let plain = |runs: Arc<AtomicU32>| {
        Router::new().route(
            "/orders",
            post(move || {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    (StatusCode::CREATED, format!("order {n}"))
                }
            }),
        )
    };
    let nested: Router = Router::new()
        .nest("/us", plain(runs.clone()))
        .nest("/eu", plain(runs.clone()))
        .layer(layer.clone());
    let to = |path: &str| {
        Request::post(path)
            .header("idempotency-key", "k-nest")
            .body(Body::from("{}"))
            .unwrap()
    };
    let us = nested.clone().oneshot(to("/us/orders")).await.unwrap();
    assert_eq!(us.status(), StatusCode::CREATED);
    let eu = nested.clone().oneshot(to("/eu/orders")).await.unwrap();
    assert_eq!(eu.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem_of(eu).await["type"], problem::KEY_REUSED);
    let again = nested.clone().oneshot(to("/us/orders")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // The layer inside the nested router (route-level) sees the same full path.
    let runs = Arc::new(AtomicU32::new(0));
    let shared = layer.clone();
    let outer: Router = Router::new()
        .nest("/us", plain(runs.clone()).layer(shared.clone()))
        .nest("/eu", plain(runs.clone()).layer(shared));
    let k = |path: &str| {
        Request::post(path)
            .header("idempotency-key", "k-nest-inner")
            .body(Body::from("{}"))
            .unwrap()
    };
    assert_eq!(
        outer
            .clone()
            .oneshot(k("/us/orders"))
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        outer
            .clone()
            .oneshot(k("/eu/orders"))
            .await
            .unwrap()
            .status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_goes_away_mid_handler_does_not_free_its_key() {
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(layer(), runs.clone(), Duration::from_millis(1_500));

    // The client gives up after 300 ms: its request's future is dropped mid-handler.
    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        app.clone().oneshot(order(Some("k-gone"), "{}")),
    )
    .await;
    assert!(gone.is_err());
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Its retry, at once: in flight.
    let res = app
        .clone()
        .oneshot(order(Some("k-gone"), "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(res.headers()["retry-after"], "1");
    let p = problem_of(res).await;
    assert_eq!(p["type"], problem::IN_FLIGHT);
    assert_eq!(p["status"], 409);

    // After the handler's end: its stored response; it ran once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let res = app
        .clone()
        .oneshot(order(Some("k-gone"), "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(text(res).await, "order 1");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_handler_longer_than_its_lease_keeps_its_key() {
    let runs = Arc::new(AtomicU32::new(0));
    let layer = layer().with_lease(Duration::from_secs(1)).unwrap();
    let app = app(layer, runs.clone(), Duration::from_secs(5));
    let first = tokio::spawn(app.clone().oneshot(order(Some("k-long"), "{}")));
    // Well past the lease (renewed every third of it), the key is still held.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let res = app
            .clone()
            .oneshot(order(Some("k-long"), "{}"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CONFLICT);
    }
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
    let res = app.oneshot(order(Some("k-long"), "{}")).await.unwrap();
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_panicking_handler_does_not_lock_its_key() {
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(layer(), runs.clone(), Duration::ZERO);
    let crashed = tokio::spawn(app.clone().oneshot(order(Some("k-panic"), "panic"))).await;
    assert!(
        crashed.unwrap_err().is_panic(),
        "the panic reaches the caller"
    );
    // The key was released before the panic reached the caller: the retry runs at once.
    let retry = tokio::spawn(app.clone().oneshot(order(Some("k-panic"), "panic"))).await;
    assert!(retry.unwrap_err().is_panic());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_crashed_worker_frees_its_key_after_the_lease() {
    let store = MemoryStore::default();
    let lease = Duration::from_secs(30);
    // A worker locked the key and died without a word.
    assert_eq!(
        store.begin("s:k", [7; 32], T, lease).await.unwrap(),
        Begin::Started
    );
    assert_eq!(
        store.begin("s:k", [7; 32], T, lease).await.unwrap(),
        Begin::InFlight
    );
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(
        store.begin("s:k", [7; 32], T, lease).await.unwrap(),
        Begin::InFlight
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        store.begin("s:k", [7; 32], T, lease).await.unwrap(),
        Begin::Started
    );
}

#[tokio::test(start_paused = true)]
async fn a_late_release_from_a_run_that_lost_its_lock_frees_nothing() {
    let store = MemoryStore::default();
    let lease = Duration::from_secs(30);
    let (first, retry) = (LockToken::random(), LockToken::random());
    assert_eq!(
        store.begin("s:k", [7; 32], first, lease).await.unwrap(),
        Begin::Started
    );
    // The first run's lease runs out (its renewals could not reach the store); a retry of the
    // same request, same fingerprint, takes the key over.
    tokio::time::advance(lease).await;
    assert_eq!(
        store.begin("s:k", [7; 32], retry, lease).await.unwrap(),
        Begin::Started
    );
    // The first run ends with a 5xx and releases "its" key: the retry still holds it.
    store.release("s:k", first).await.unwrap();
    assert_eq!(
        store
            .begin("s:k", [7; 32], LockToken::random(), lease)
            .await
            .unwrap(),
        Begin::InFlight
    );
    assert!(!store.renew("s:k", [7; 32], first, lease).await.unwrap());
    // Its late response is not stored over the running retry; the retry's is.
    store
        .complete("s:k", [7; 32], first, done(), lease)
        .await
        .unwrap();
    assert_eq!(
        store.begin("s:k", [7; 32], retry, lease).await.unwrap(),
        Begin::InFlight
    );
    assert!(store.renew("s:k", [7; 32], retry, lease).await.unwrap());
}

/// One execution's token, for the calls these tests make on a store directly.
const T: LockToken = LockToken::from_u128(1);

fn done() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![],
        body: "x".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn the_memory_store_stays_bounded() {
    let store = MemoryStore::new(100).unwrap();
    let lease = Duration::from_secs(60);
    for i in 0..1_000 {
        let k = format!("k{i}");
        assert_eq!(
            store.begin(&k, [1; 32], T, lease).await.unwrap(),
            Begin::Started
        );
        store
            .complete(&k, [1; 32], T, done(), Duration::from_secs(3_600))
            .await
            .unwrap();
    }
    assert_eq!(store.len(), 100);
    // The newest are kept, the oldest completed ones went first.
    assert!(matches!(
        store.begin("k999", [1; 32], T, lease).await.unwrap(),
        Begin::Completed(_)
    ));
    assert_eq!(
        store.begin("k0", [1; 32], T, lease).await.unwrap(),
        Begin::Started
    );

    // Full of running requests: a new key is refused, not a lock evicted.
    let full = MemoryStore::new(3).unwrap();
    for k in ["a", "b", "c"] {
        full.begin(k, [1; 32], T, lease).await.unwrap();
    }
    let err = full.begin("d", [1; 32], T, lease).await.unwrap_err();
    assert!(err.is::<sturdy_idempotency::server::StoreFull>());
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(
        full.begin("d", [1; 32], T, lease).await.unwrap(),
        Begin::Started
    );
}

#[tokio::test(start_paused = true)]
async fn expired_entries_are_not_counted_and_are_purged() {
    let store = MemoryStore::new(1_000).unwrap();
    for i in 0..500 {
        let k = format!("k{i}");
        store
            .begin(&k, [1; 32], T, Duration::from_secs(60))
            .await
            .unwrap();
        store
            .complete(&k, [1; 32], T, done(), Duration::from_secs(10))
            .await
            .unwrap();
    }
    // A lock that nobody completes.
    store
        .begin("lost", [1; 32], T, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(store.len(), 501);
    let held = store.heap_bytes();
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(store.len(), 1, "the responses expired");
    assert!(
        store.heap_bytes() < held / 100,
        "and their memory was freed"
    );
    tokio::time::advance(Duration::from_secs(20)).await;
    assert!(store.is_empty(), "the lease ran out");
    assert_eq!(store.heap_bytes(), 0);
}

#[test]
fn a_store_of_zero_entries_is_refused_when_built() {
    let err = MemoryStore::new(0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid idempotency configuration: a MemoryStore must hold at least one entry"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413() {
    let app = Router::new()
        .route("/orders", post(|| async { "ok" }))
        .layer(
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
                .with_body_limit(8),
        );
    let res = app.oneshot(order(Some("k"), "0123456789")).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(problem_of(res).await["type"], problem::BODY_TOO_LARGE);
}

#[tokio::test]
async fn the_query_string_is_part_of_the_fingerprint() {
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(layer(), runs.clone(), Duration::ZERO);
    let order = |uri: &str| {
        Request::post(uri)
            .header("idempotency-key", "k-query")
            .body(Body::from("{\"amount\":5}"))
            .unwrap()
    };
    let eur = app
        .clone()
        .oneshot(order("/orders?currency=EUR"))
        .await
        .unwrap();
    assert_eq!(eur.status(), StatusCode::CREATED);
    let usd = app
        .clone()
        .oneshot(order("/orders?currency=USD"))
        .await
        .unwrap();
    assert_eq!(usd.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem_of(usd).await["type"], problem::KEY_REUSED);
    let none = app.clone().oneshot(order("/orders")).await.unwrap();
    assert_eq!(none.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let again = app.oneshot(order("/orders?currency=EUR")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn clients_with_the_same_key_never_see_each_others_response() {
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(layer(), runs.clone(), Duration::ZERO);
    let order = |header: &str, credential: &str| {
        Request::post("/orders")
            .header("idempotency-key", "1")
            .header(header, credential)
            .body(Body::from("{}"))
            .unwrap()
    };
    let mut n = 0;
    for header in [
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-auth-token",
        "cookie",
    ] {
        for client in ["alice", "bob"] {
            n += 1;
            let credential = format!("secret-of-{client}");
            let first = app
                .clone()
                .oneshot(order(header, &credential))
                .await
                .unwrap();
            assert!(
                first.headers().get("idempotent-replayed").is_none(),
                "{header} {client}"
            );
            assert_eq!(text(first).await, format!("order {n}"));
            let again = app
                .clone()
                .oneshot(order(header, &credential))
                .await
                .unwrap();
            assert_eq!(again.headers()["idempotent-replayed"], "true");
            assert_eq!(text(again).await, format!("order {n}"), "{header} {client}");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), n);
}

/// What a TLS acceptor would put in the request's extensions.
#[derive(Clone)]
struct PeerIdentity(&'static str);

#[tokio::test]
async fn a_scope_can_come_from_the_request_extensions() {
    let runs = Arc::new(AtomicU32::new(0));
    let scope = |head: &Parts| match head.extensions.get::<PeerIdentity>() {
        Some(peer) => format!("mtls:{}", peer.0),
        None => "anonymous".to_owned(),
    };
    let layer = IdempotencyLayer::new(MemoryStore::default(), scope).with_require_key(true);
    let app = app(layer, runs.clone(), Duration::ZERO);
    let order = |peer: &'static str| {
        let mut r = order(Some("k"), "{}");
        r.extensions_mut().insert(PeerIdentity(peer));
        r
    };
    for (peer, expect) in [("a", "order 1"), ("b", "order 2"), ("a", "order 1")] {
        let res = app.clone().oneshot(order(peer)).await.unwrap();
        assert_eq!(text(res).await, expect, "{peer}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_custom_scope_separates_tenants() {
    let runs = Arc::new(AtomicU32::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::default(), |head: &Parts| {
        head.headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned()
    });
    let app = app(layer, runs.clone(), Duration::ZERO);
    let order = |tenant: &str| {
        Request::post("/orders")
            .header("idempotency-key", "k")
            .header("x-tenant", tenant)
            .body(Body::from("{}"))
            .unwrap()
    };
    for tenant in ["a", "b", "a"] {
        assert_eq!(
            app.clone().oneshot(order(tenant)).await.unwrap().status(),
            StatusCode::CREATED
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "tenant a's repeat was a replay, tenant b ran"
    );
}

/// A handler that answers `status` with a body of `len` bytes, counting its runs.
fn answering(
    status: u16,
    len: usize,
    runs: Arc<AtomicU32>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    service_fn(move |_req: Request<Full<Bytes>>| {
        runs.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::from(vec![b'x'; len]))
                    .unwrap(),
            )
        }
    })
}

fn keyed(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Full::from("{}"))
        .unwrap()
}

#[tokio::test]
async fn a_response_too_large_to_keep_is_not_run_again() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_response_limit(64)
        .layer(answering(201, 65, runs.clone()));
    for _ in 0..2 {
        let res = svc.clone().oneshot(keyed("k-big")).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let p: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(p["type"], problem::RESPONSE_TOO_LARGE);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // At the limit, the response is kept.
    let svc = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_response_limit(64)
        .layer(answering(201, 64, runs.clone()));
    assert_eq!(
        svc.clone().oneshot(keyed("k-64")).await.unwrap().status(),
        StatusCode::CREATED
    );
    let again = svc.oneshot(keyed("k-64")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
}

#[tokio::test]
async fn server_errors_are_stored_only_when_asked() {
    for (store, runs_after_two) in [(false, 2), (true, 1)] {
        let runs = Arc::new(AtomicU32::new(0));
        let svc = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
            .with_store_server_errors(store)
            .layer(answering(503, 4, runs.clone()));
        for _ in 0..2 {
            let res = svc.clone().oneshot(keyed("k-5xx")).await.unwrap();
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            runs_after_two,
            "store: {store}"
        );
    }
    // 429 is never stored.
    let runs = Arc::new(AtomicU32::new(0));
    let svc = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_store_server_errors(true)
        .layer(answering(429, 4, runs.clone()));
    for _ in 0..2 {
        svc.clone().oneshot(keyed("k-429")).await.unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A store that fails the operations it is told to fail.
#[derive(Debug, Clone)]
struct Failing {
    inner: MemoryStore,
    begin: bool,
    complete: bool,
}

fn down() -> BoxError {
    "store down".into()
}

impl IdempotencyStore for Failing {
    fn begin(
        &self,
        k: &str,
        fp: Fingerprint,
        t: LockToken,
        l: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        if self.begin {
            return Box::pin(async { Err(down()) });
        }
        self.inner.begin(k, fp, t, l)
    }
    fn renew(
        &self,
        k: &str,
        fp: Fingerprint,
        t: LockToken,
        l: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        self.inner.renew(k, fp, t, l)
    }
    fn complete(
        &self,
        k: &str,
        fp: Fingerprint,
        t: LockToken,
        r: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        if self.complete {
            return Box::pin(async { Err(down()) });
        }
        self.inner.complete(k, fp, t, r, ttl)
    }
    fn release(&self, k: &str, t: LockToken) -> BoxFuture<Result<(), BoxError>> {
        self.inner.release(k, t)
    }
}

#[tokio::test]
async fn a_store_that_is_down_gets_503_and_the_handler_does_not_run() {
    let runs = Arc::new(AtomicU32::new(0));
    let store = Failing {
        inner: MemoryStore::default(),
        begin: true,
        complete: false,
    };
    let svc = IdempotencyLayer::new(store, ByCredentials::default()).layer(answering(
        201,
        4,
        runs.clone(),
    ));
    let res = svc.oneshot(keyed("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let p: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(p["type"], problem::STORE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_response_that_cannot_be_stored_still_reaches_its_client_and_the_key_stays_held() {
    let runs = Arc::new(AtomicU32::new(0));
    let store = Failing {
        inner: MemoryStore::default(),
        begin: false,
        complete: true,
    };
    let svc = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(Duration::from_secs(10))
        .unwrap()
        .layer(answering(201, 4, runs.clone()));
    let res = svc.clone().oneshot(keyed("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    // The key is not released: a retry within the lease is told to wait.
    let res = svc.clone().oneshot(keyed("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(
        svc.oneshot(keyed("k")).await.unwrap().status(),
        StatusCode::CREATED
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[test]
fn without_a_tokio_runtime_the_request_runs_in_its_own_future() {
    let runs = Arc::new(AtomicU32::new(0));
    let svc = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .layer(answering(201, 4, runs.clone()));
    let poll = |mut fut: std::pin::Pin<Box<dyn std::future::Future<Output = _>>>| {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => panic!("a memory store and a ready handler finish at once"),
        }
    };
    let first: Result<Response<_>, Infallible> = poll(Box::pin(svc.clone().oneshot(keyed("k"))));
    assert_eq!(first.unwrap().status(), StatusCode::CREATED);
    let again: Result<Response<_>, Infallible> = poll(Box::pin(svc.oneshot(keyed("k"))));
    assert_eq!(again.unwrap().headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_service_made_ready_gets_the_request_under_a_concurrency_limit() {
    let runs = Arc::new(AtomicU32::new(0));
    let mut svc = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_require_key(true)
        .layer(tower::limit::ConcurrencyLimit::new(
            answering(201, 4, runs.clone()),
            1,
        ));
    let run = async {
        for i in 0..20 {
            // A rejected request leaves the ready service (and its permit) in place.
            let missing = Request::post("/orders").body(Full::from("{}")).unwrap();
            let res = svc.ready().await.unwrap().call(missing).await.unwrap();
            assert_eq!(res.status(), StatusCode::BAD_REQUEST);
            let res = svc
                .ready()
                .await
                .unwrap()
                .call(keyed(&format!("k{i}")))
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::CREATED);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("no permit is stranded");
    assert_eq!(runs.load(Ordering::SeqCst), 20);
}

#[test]
fn traits() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send<T: Send>(_: &T) {}
    send_sync_clone::<IdempotencyLayer<MemoryStore>>();
    send_sync_clone::<sturdy_idempotency::server::Idempotency<Router, MemoryStore>>();
    send_sync_clone::<MemoryStore>();
    send_sync_clone::<ByCredentials>();
    let svc = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .layer(answering(201, 1, Arc::default()));
    let fut = svc.oneshot(keyed("k"));
    send(&fut);
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_limit_inside_the_layer_counts_executions_whose_client_left() {
    let runs = Arc::new(AtomicU32::new(0));
    let app = Router::new()
        .route(
            "/orders",
            post({
                let runs = runs.clone();
                move || {
                    let runs = runs.clone();
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1_500)).await;
                        StatusCode::CREATED
                    }
                }
            }),
        )
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .layer(layer())
        // Makes the routes once, as `axum::serve` does, so every call shares one limit.
        .with_state(());
    let start = tokio::time::Instant::now();
    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        app.clone().oneshot(order(Some("a"), "{}")),
    )
    .await;
    assert!(gone.is_err());
    // Another key waits for the abandoned execution's permit, then runs.
    let res = app.oneshot(order(Some("b"), "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(start.elapsed(), Duration::from_millis(3_000));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn refusals_name_the_key_header_the_layer_reads() {
    let runs = Arc::new(AtomicU32::new(0));
    let custom = layer().with_header(http::HeaderName::from_static("x-op-key"));
    let app = app(custom, runs.clone(), Duration::ZERO);
    let missing = app.clone().oneshot(order(None, "{}")).await.unwrap();
    let p = problem_of(missing).await;
    assert_eq!(p["type"], problem::MISSING_KEY);
    assert_eq!(p["detail"], "this operation requires an x-op-key header");
    let bad = Request::post("/orders")
        .header("x-op-key", "has space")
        .body(Body::from("{}"))
        .unwrap();
    let p = problem_of(app.clone().oneshot(bad).await.unwrap()).await;
    assert!(p["detail"].as_str().unwrap().contains("x-op-key"), "{p}");
    let two = Request::post("/orders")
        .header("x-op-key", "a1")
        .header("x-op-key", "b2")
        .body(Body::from("{}"))
        .unwrap();
    let p = problem_of(app.clone().oneshot(two).await.unwrap()).await;
    assert!(
        p["detail"].as_str().unwrap().contains("send one x-op-key"),
        "{p}"
    );
    // The default header keeps its usual spelling.
    let p = problem_of(app_default().oneshot(order(None, "{}")).await.unwrap()).await;
    assert_eq!(
        p["detail"],
        "this operation requires an Idempotency-Key header"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

fn app_default() -> Router {
    app(layer(), Arc::new(AtomicU32::new(0)), Duration::ZERO)
}
