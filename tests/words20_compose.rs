//! Composition: each layer and the whole client under tower's `Buffer`, `Timeout`, `LoadShed`
//! and `ConcurrencyLimit(1)`, driven as kept services by several callers at once; the server
//! pieces inside axum apps with tower-http layers.
#![cfg(feature = "full")]
// Webhook timestamps are wall-clock seconds.
#![allow(clippy::disallowed_methods)]

use crate::outsider_common;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use outsider_common::*;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, Delivery};
use sturdy::hedge::HedgeLayer;
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::version::VersionLayer;
use sturdy::webhook::{sign_standard, MemoryQueue, StandardWebhooks, WebhookReceiver};
use sturdy::ClientBuilder;
use tokio::time::timeout;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const HOST: &str = "api.example.com";
const BOUND: Duration = Duration::from_secs(60);

type Req = Request<Full<Bytes>>;

/// Puts `svc` over `ConcurrencyLimit(1)` of a fresh API, under `Buffer(4)` and a 2 s `Timeout`;
/// pushes `hangs` hanging answers; then 8 callers each drive a clone as a kept service for 3
/// calls. Every call must end; after the hangs, all calls must succeed.
async fn drive<L, S, B>(layer: L, hangs: usize)
where
    L: Layer<
        tower::limit::ConcurrencyLimit<
            tower::util::BoxCloneSyncService<Req, Response<Full<Bytes>>, BoxError>,
        >,
        Service = S,
    >,
    S: Service<Req, Response = Response<B>> + Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    let api = Api::new(vec![], Answer::Slow(Duration::from_millis(20)));
    for _ in 0..hangs {
        api.push(Answer::Hang);
    }
    let inner = tower::util::BoxCloneSyncService::new(api.service());
    let svc = layer.layer(ServiceBuilder::new().concurrency_limit(1).service(inner));
    let outer = ServiceBuilder::new()
        .buffer(4)
        .timeout(Duration::from_secs(2))
        .service(svc);
    let mut tasks = Vec::new();
    for c in 0..8 {
        let mut kept = outer.clone();
        tasks.push(tokio::spawn(async move {
            let mut oks = 0;
            for i in 0..3 {
                let req = get(&format!("http://{HOST}/c{c}/{i}"));
                if kept.ready().await?.call(req).await.is_ok() {
                    oks += 1;
                }
            }
            Ok::<_, BoxError>(oks)
        }));
    }
    let mut oks = 0;
    for t in tasks {
        oks += timeout(BOUND, t)
            .await
            .expect("a caller hung")
            .unwrap()
            .unwrap();
    }
    assert!(oks >= 24 - hangs * 2, "only {oks} of 24 calls succeeded");
    // Whatever was held is back: one more call goes through at once.
    let res = timeout(
        Duration::from_secs(5),
        outer.clone().oneshot(get(&format!("http://{HOST}/last"))),
    )
    .await
    .expect("the last call hung")
    .expect("the last call failed");
    drop(res);
}

/// README: "Every layer keeps tower's readiness contract, so the client (or any layer alone) can
/// sit under a `Buffer` or over a `ConcurrencyLimit`, driven by `oneshot` or a kept
/// `ready().await?.call(req)`." The retry layer, with two hanging attempts cut by `Timeout`.
#[tokio::test(start_paused = true)]
async fn retry_alone_kept_under_buffer_and_timeout_over_a_limit_of_one() {
    drive(RetryLayer::new().with_seed(3), 2).await;
}

/// README, same sentence: the rate limiter with a quota (callers wait in its line holding the
/// permit below).
#[tokio::test(start_paused = true)]
async fn rate_limit_alone_kept_under_buffer_and_timeout_over_a_limit_of_one() {
    drive(RateLimitLayer::new(Quota::per_second(50).unwrap()), 2).await;
}

/// README, same sentence: the circuit breaker.
#[tokio::test(start_paused = true)]
async fn circuit_alone_kept_under_buffer_and_timeout_over_a_limit_of_one() {
    drive(CircuitBreakerLayer::new().with_consecutive_failures(50), 2).await;
}

/// README, same sentence: adaptive concurrency.
#[tokio::test(start_paused = true)]
async fn adaptive_concurrency_alone_kept_under_buffer_and_timeout_over_a_limit_of_one() {
    drive(AdaptiveConcurrencyLayer::new().with_initial_limit(2), 2).await;
}

/// README, same sentence: hedging (its second copy waits for the only permit).
#[tokio::test(start_paused = true)]
async fn hedge_alone_kept_under_buffer_and_timeout_over_a_limit_of_one() {
    drive(HedgeLayer::new().with_min_samples(5), 2).await;
}

/// README, same sentence: coalescing (identical URIs are not used, so each caller starts its
/// own call).
#[tokio::test(start_paused = true)]
async fn coalesce_alone_kept_under_buffer_and_timeout_over_a_limit_of_one() {
    drive(CoalesceLayer::new(), 2).await;
}

/// README, same sentence: static auth, the version pin and the client key layer stacked.
#[tokio::test(start_paused = true)]
async fn auth_version_and_keys_kept_under_buffer_and_timeout_over_a_limit_of_one() {
    let stack = tower::layer::util::Stack::new(
        AuthLayer::bearer("t0k").unwrap(),
        tower::layer::util::Stack::new(
            VersionLayer::header("api-version", "1").unwrap(),
            IdempotencyKeyLayer::new(),
        ),
    );
    drive(stack, 2).await;
}

/// README, same sentence: OAuth2 with a token endpoint that takes 500 ms; every caller waits
/// for the one token request while holding its buffer slot.
#[tokio::test(start_paused = true)]
async fn oauth2_kept_under_buffer_and_timeout_over_a_limit_of_one() {
    let idp = Api::new(
        vec![],
        after(
            Duration::from_millis(500),
            Answer::Status(
                200,
                vec![("content-type", "application/json".to_owned())],
                r#"{"access_token":"a","token_type":"Bearer","expires_in":3600}"#,
            ),
        ),
    );
    let tokens = ClientCredentials::new(idp.service(), "http://idp.local/t", "id", "s").unwrap();
    drive(AuthLayer::oauth2(tokens), 0).await;
    assert_eq!(idp.calls(), 1);
}

/// README, same sentence, for the whole `ClientBuilder` stack with every optional layer and a
/// quota: kept under `Buffer` and `Timeout`, over `ConcurrencyLimit(1)`.
#[tokio::test(start_paused = true)]
async fn the_whole_client_kept_under_buffer_and_timeout_over_a_limit_of_one() {
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(9))
        .with_rate_limit(RateLimitLayer::new(Quota::per_second(100).unwrap()))
        .with_hedge(HedgeLayer::new().with_min_samples(5))
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_coalesce(CoalesceLayer::new())
        .with_auth(AuthLayer::bearer("t").unwrap())
        .with_attempt_timeout(Duration::from_millis(500));
    let layer = tower::layer::layer_fn(move |inner| client.clone().build(inner));
    drive(layer, 2).await;
}

/// docs/guides/circuit.md: "an error for a call that never reached the dependency is not counted
/// at all ... (sturdy's, or tower's `LoadShed` over a service that is not ready)"; retry.md: "a
/// try that a layer below refused before it was sent ... counts against `max_attempts` but is
/// not an attempt". Ten keyed POSTs at once through the client over `LoadShed` +
/// `ConcurrencyLimit(1)`: none hangs; each fails as `NotSent` or succeeds; the breaker stays
/// closed; each key reaches the API at most once.
#[tokio::test(start_paused = true)]
async fn the_client_over_load_shed_sheds_as_not_sent_and_keeps_its_breaker_closed() {
    let api = Api::new(vec![], Answer::Slow(Duration::from_millis(100)));
    let http = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(1)
        .service(api.service());
    let (breaker, states) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let client = ClientBuilder::new()
        .with_circuit_breaker(breaker)
        .build(http);
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut kept = client.clone();
        tasks.push(tokio::spawn(async move {
            let req = post(&format!("http://{HOST}/orders/{i}"), "{}");
            kept.ready().await?.call(req).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match timeout(BOUND, t).await.expect("hung").unwrap() {
            Ok(res) => {
                assert_eq!(res.status(), StatusCode::OK);
                ok += 1;
            }
            Err(e) => assert_eq!(delivery(&*e), Delivery::NotSent, "{e}"),
        }
    }
    assert!(ok >= 1);
    assert_eq!(states.state(HOST), Some(CircuitState::Closed));
    let mut keys: Vec<_> = api
        .seen()
        .iter()
        .map(|s| s.headers["idempotency-key"].clone())
        .collect();
    let n = keys.len();
    keys.dedup();
    keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    keys.dedup();
    assert_eq!(keys.len(), n, "a key reached the API twice");
}

/// README: "Every layer keeps tower's readiness contract ... driven by ... a kept
/// `ready().await?.call(req)`." The client kept under `LoadShed` over `Buffer(1)`: twenty
/// callers at once each get an answer or `Overloaded`, none hangs, and a call afterwards goes.
#[tokio::test(start_paused = true)]
async fn the_client_under_load_shed_over_a_buffer_of_one_never_hangs() {
    let api = Api::new(
        vec![status_h(429, &[("retry-after", "1")])],
        Answer::Slow(Duration::from_millis(30)),
    );
    let client = ClientBuilder::new()
        .with_rate_limit(RateLimitLayer::new(Quota::per_second(20).unwrap()))
        .build(api.service());
    let outer = ServiceBuilder::new().load_shed().buffer(1).service(client);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut kept = outer.clone();
        tasks.push(tokio::spawn(async move {
            let req = get(&format!("http://{HOST}/l/{i}"));
            kept.ready().await?.call(req).await
        }));
    }
    let mut answered = 0;
    for t in tasks {
        match timeout(BOUND, t).await.expect("hung").unwrap() {
            Ok(_) => answered += 1,
            Err(e) => assert!(
                e.is::<tower::load_shed::error::Overloaded>()
                    || sturdy::core::find::<sturdy::core::Error>(&*e).is_some(),
                "{e}"
            ),
        }
    }
    assert!(answered >= 1);
    let res = timeout(
        Duration::from_secs(5),
        outer.clone().oneshot(get(&format!("http://{HOST}/after"))),
    )
    .await
    .expect("hung")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

fn idempotent_app(runs: Arc<AtomicUsize>, delay: Duration) -> axum::Router {
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: String| {
                let runs = runs.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    (StatusCode::CREATED, format!("order {n}: {body}"))
                }
            }),
        )
        .layer(tower_http::set_header::SetResponseHeaderLayer::overriding(
            http::header::HeaderName::from_static("x-inner"),
            HeaderValue::from_static("stored"),
        ))
        .layer(layer)
}

fn chunked_body(bytes: &[u8]) -> Body {
    Body::from_stream(futures_util::stream::iter(
        bytes
            .chunks(16)
            .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    ))
}

fn keyed(key: &str) -> Request<Body> {
    Request::post("/orders")
        .header("authorization", "Bearer c1")
        .header("idempotency-key", key)
        .body(Body::from("book"))
        .unwrap()
}

/// docs/guides/idempotency.md: "client timeout mid-handler | the handler runs to its end in its
/// own task; its response is stored | ... a retry with the same key gets 409 in flight
/// (`Retry-After: 1`) while the handler runs, then the stored response with
/// `Idempotent-Replayed: true`; the handler ran once". Here the timeout is tower-http's
/// `TimeoutLayer` (a 408 answer) outside the layer.
#[tokio::test]
async fn tower_http_timeout_outside_the_server_layer_does_not_let_a_duplicate_run() {
    let runs = Arc::new(AtomicUsize::new(0));
    #[allow(deprecated)]
    let app = idempotent_app(runs.clone(), Duration::from_millis(300)).layer(
        tower_http::timeout::TimeoutLayer::new(Duration::from_millis(50)),
    );
    let res = app.clone().oneshot(keyed("k-timeout")).await.unwrap();
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    let res = app.clone().oneshot(keyed("k-timeout")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(res.headers()["retry-after"], "1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let res = app.clone().oneshot(keyed("k-timeout")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(res.headers()["x-inner"], "stored");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"order 1: book");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// docs/guides/idempotency.md: "The inner service, its future, the request body and the response
/// body must be `Send + 'static` (axum's are)" and the layer composes with tower-http's body
/// limit outside it: a body over tower-http's limit is refused before the handler, and the key
/// stays free for a smaller retry.
#[tokio::test]
async fn tower_http_body_limit_outside_the_server_layer_leaves_the_key_free() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = idempotent_app(runs.clone(), Duration::ZERO)
        .layer(tower_http::limit::RequestBodyLimitLayer::new(16));
    let big = Request::post("/orders")
        .header("authorization", "Bearer c1")
        .header("idempotency-key", "k-limit")
        .header("content-length", "64")
        .body(Body::from("x".repeat(64)))
        .unwrap();
    let res = app.clone().oneshot(big).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The same body sent chunked (no Content-Length): cut while the layer reads it.
    let chunked = Request::post("/orders")
        .header("authorization", "Bearer c1")
        .header("idempotency-key", "k-limit")
        .body(chunked_body(&[b'x'; 64]))
        .unwrap();
    let res = app.clone().oneshot(chunked).await.unwrap();
    assert!(res.status().is_client_error(), "{}", res.status());
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let small = Request::post("/orders")
        .header("authorization", "Bearer c1")
        .header("idempotency-key", "k-limit")
        .body(Body::from("x"))
        .unwrap();
    let res = app.clone().oneshot(small).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// docs/guides/webhooks.md: "200 only once the event is queued; a duplicate gets 200 and is not
/// queued again" and "Body: read up to the limit ... past it, 413". The receiver as an axum route
/// under tower-http's `TimeoutLayer`, `RequestBodyLimitLayer` and `CatchPanicLayer`.
#[tokio::test]
async fn webhook_receiver_under_tower_http_layers() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (queue, mut events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(secret).unwrap(), queue);
    #[allow(deprecated)]
    let app: axum::Router = axum::Router::new()
        .route_service("/wh", axum::routing::post_service(receiver))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(1024))
        .layer(tower_http::timeout::TimeoutLayer::new(Duration::from_secs(
            5,
        )))
        .layer(tower_http::catch_panic::CatchPanicLayer::new());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let deliver = |id: &str, body: Vec<u8>| {
        Request::post("/wh")
            .header("webhook-id", id)
            .header("webhook-timestamp", now.to_string())
            .header(
                "webhook-signature",
                sign_standard(secret, id, now, &body).unwrap(),
            )
            .body(Body::from(body))
            .unwrap()
    };
    for _ in 0..2 {
        let res = app
            .clone()
            .oneshot(deliver("msg_a", br#"{"a":1}"#.to_vec()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let mut big = deliver("msg_big", vec![b'x'; 4096]);
    big.headers_mut()
        .insert("content-length", HeaderValue::from_static("4096"));
    let res = app.clone().oneshot(big).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let first = events.try_recv().expect("not queued");
    assert_eq!(first.id, "msg_a");
    assert!(events.try_recv().is_none(), "queued twice or the big one");
}

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>(_: &T) {}

/// README: "The client is `Clone + Send + Sync`: keep one in axum `State` or an `Arc`, and clone
/// it per call." The client over a tower `Buffer` with every layer, and an axum app with both
/// server pieces, are `Send + Sync + Clone` and serve from spawned tasks.
#[tokio::test]
async fn composed_clients_and_apps_are_send_sync_clone() {
    let api = Api::new(vec![], ok());
    let client = ClientBuilder::new()
        .with_hedge(HedgeLayer::new())
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_coalesce(CoalesceLayer::new())
        .build(
            ServiceBuilder::new()
                .buffer(4)
                .service(tower::util::BoxCloneSyncService::<
                    Req,
                    Response<Full<Bytes>>,
                    BoxError,
                >::new(api.service())),
        );
    assert_send_sync_clone(&client);
    let (queue, _events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(
        StandardWebhooks::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
        queue,
    );
    assert_send_sync_clone(&receiver);
    let app = idempotent_app(Arc::new(AtomicUsize::new(0)), Duration::ZERO)
        .route_service("/wh", axum::routing::post_service(receiver));
    assert_send_sync_clone(&app);
    let t = tokio::spawn(async move {
        let res = client
            .oneshot(get(&format!("http://{HOST}/x")))
            .await
            .unwrap();
        let app_res = app.oneshot(keyed("k-send")).await.unwrap();
        (res.status(), app_res.status())
    });
    assert_eq!(t.await.unwrap(), (StatusCode::OK, StatusCode::CREATED));
}

/// docs/guides/webhooks.md: "Body: read up to the limit \\[1 MiB, `with_body_limit`\\]; past it,
/// 413" and "Every rejection answers a short generic text (`forbidden`, `invalid signature`,
/// `payload too large`)". A chunked delivery cut by tower-http's `RequestBodyLimitLayer` outside
/// the receiver is too large, not badly signed: it must be answered 413 `payload too large` (as
/// axum's own extractors answer tower-http's length limit), and nothing is queued.
#[tokio::test]
async fn a_chunked_delivery_over_an_outer_body_limit_is_413_not_invalid_signature() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (queue, mut events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(secret).unwrap(), queue);
    let app: axum::Router = axum::Router::new()
        .route_service("/wh", axum::routing::post_service(receiver))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(1024));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = vec![b'x'; 4096];
    let req = Request::post("/wh")
        .header("webhook-id", "msg_chunked")
        .header("webhook-timestamp", now.to_string())
        .header(
            "webhook-signature",
            sign_standard(secret, "msg_chunked", now, &body).unwrap(),
        )
        .body(chunked_body(&body))
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    let status = res.status();
    let text = res.into_body().collect().await.unwrap().to_bytes();
    assert!(events.try_recv().is_none());
    assert_eq!(
        (status, String::from_utf8_lossy(&text).into_owned()),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload too large".to_owned()
        )
    );
}

/// docs/guides/ratelimit.md: "A waiting call reserves nothing. If it is dropped (a timeout above
/// it, an aborted task), it leaves the line and the calls behind it move up"; reqwest.md: the
/// `SturdyMiddleware` stack "is built once, so every call shares its breakers, limits". Over a
/// real loopback socket through reqwest-middleware: ten calls cut while in line cost the next
/// one nothing, and none of them reached the server.
#[tokio::test]
async fn reqwest_middleware_calls_dropped_in_the_rate_limit_line_cost_nothing() {
    use sturdy::reqwest::SturdyMiddleware;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/r",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let limit = RateLimitLayer::new(Quota::per_second(4).unwrap());
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new().with_rate_limit(limit).build(next)
        }))
        .build();
    let url = format!("http://{addr}/r");
    let first = client.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let t0 = std::time::Instant::now();
    for _ in 0..10 {
        let cut = timeout(Duration::from_millis(20), client.get(&url).send()).await;
        assert!(cut.is_err(), "a call in line was not held");
    }
    let res = timeout(Duration::from_secs(5), client.get(&url).send())
        .await
        .expect("hung")
        .unwrap();
    assert_eq!(res.status(), 200);
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_millis(600),
        "the next call waited {waited:?} after ten dropped ones"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    server.abort();
}

/// docs/guides/paginate.md: "`Paginate::new(service, uri, strategy)`" over any service; README:
/// the client "can sit under a `Buffer` or over a `ConcurrencyLimit`". Four walks at once through
/// one pager over the client kept under `Buffer(1)` over `ConcurrencyLimit(1)`, with a 503 in the
/// way: every walk gets every item, none hangs.
#[tokio::test(start_paused = true)]
async fn concurrent_walks_through_the_client_under_buffer_over_a_limit_of_one() {
    use futures_util::TryStreamExt;
    use sturdy::paginate::{JsonCursor, Paginate};
    let api = Api::new(vec![status(503)], ok());
    let page = |body: &'static str| {
        Answer::Status(
            200,
            vec![("content-type", "application/json".to_owned())],
            body,
        )
    };
    api.set_fallback(page(r#"{"data":[1,2],"next":null}"#));
    let http =
        ServiceBuilder::new()
            .concurrency_limit(1)
            .service(tower::util::BoxCloneSyncService::<
                Req,
                Response<Full<Bytes>>,
                BoxError,
            >::new(api.service()));
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(8))
        .build(http);
    let kept = ServiceBuilder::new().buffer(1).service(client);
    let pager = Arc::new(
        Paginate::new(
            kept,
            &format!("http://{HOST}/items"),
            JsonCursor::new("/data", "/next"),
        )
        .unwrap(),
    );
    let walks: Vec<_> = (0..4)
        .map(|_| {
            let p = pager.clone();
            tokio::spawn(async move { p.items().try_collect::<Vec<_>>().await })
        })
        .collect();
    for w in walks {
        let items = timeout(BOUND, w).await.expect("hung").unwrap().unwrap();
        assert_eq!(items.len(), 2);
    }
}
