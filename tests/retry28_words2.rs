//! More of the retry guide's words ("What the caller gets"): attempts counted in the message,
//! refused tries counted apart, per-request attempt timeouts in `ClientBuilder`, sharing the
//! client through axum `State`, and the in-flight 409 end to end over loopback against the
//! server idempotency layer.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get as axum_get, post as axum_post};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use sturdy::core::classify::delivery;
use sturdy::core::{find, BoxError, CallOptions, CallReport, Delivery, ErrorKind, RateLimited};
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::{Client, ClientBuilder};
use tower::{Layer, ServiceExt};

use crate::retry28_common::*;

const URL: &str = "http://api.example.com/orders";

#[tokio::test(start_paused = true)]
async fn one_attempt_is_not_called_attempts() {
    for n in [1u32, 2] {
        let (svc, _) = api(|_, _| Err(reset()));
        let err = RetryLayer::new()
            .with_max_attempts(n)
            .layer(svc)
            .oneshot(get(URL))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("1 attempts"), "{text}");
        assert!(text.contains("connection reset by peer"), "{text}");
        if n == 2 {
            assert!(text.starts_with("gave up after 2 attempts: "), "{text}");
        }
        assert_eq!(top(&err).report().unwrap().attempts(), n);
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_try_after_a_503_is_counted_apart() {
    let (svc, seen) = api(|n, _| {
        if n == 0 {
            Ok(status(503))
        } else {
            Err(
                Box::new(RateLimited::new(Duration::from_secs(120)).with_scope("api.example.com"))
                    as BoxError,
            )
        }
    });
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "k-refused".parse().unwrap());
    let err = RetryLayer::new()
        .with_seed(1)
        .layer(svc)
        .oneshot(r)
        .await
        .unwrap_err();
    assert_eq!(seen.len(), 2);
    let text = err.to_string();
    assert!(
        text.starts_with(
            "gave up after 1 attempt and 1 refused try: 503 Service Unavailable; the try after it was refused before it was sent: "
        ),
        "{text}"
    );
    assert!(
        text.ends_with(
            "; it may have been processed: retry with the same idempotency key k-refused"
        ),
        "{text}"
    );
    let e = top(&err);
    assert_eq!(
        *e.kind(),
        ErrorKind::Server(http::StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(e.report().unwrap().attempts(), 1);
    assert_eq!(e.report().unwrap().delivery(), Delivery::MaybeProcessed);
    assert!(e.related().is_some());
    assert!(
        std::error::Error::source(e).is_none(),
        "a status leaves no source"
    );
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(120)
    );
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

#[tokio::test(start_paused = true)]
async fn every_try_refused_reports_zero_attempts_and_not_sent() {
    let (svc, seen) = api(|_, _| {
        Err(
            Box::new(RateLimited::new(Duration::from_millis(10)).with_scope("api.example.com"))
                as BoxError,
        )
    });
    let err = RetryLayer::new()
        .layer(svc)
        .oneshot(post(URL, "{}"))
        .await
        .unwrap_err();
    assert_eq!(seen.len(), 4);
    let e = top(&err);
    assert_eq!(e.report().unwrap().attempts(), 0);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let text = err.to_string();
    assert!(
        text.ends_with("the request was not sent, so it is safe to send again"),
        "{text}"
    );
    assert!(!text.contains("gave up after 4 attempts"), "{text}");
}

fn slow(secs: u64) -> Api {
    let (svc, _) = api(|_, _| Ok(status(200)));
    let s = tower::service_fn(move |r: Req| {
        let svc = svc.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            svc.oneshot(r).await
        }
    });
    tower::util::BoxCloneSyncService::new(s)
}

#[tokio::test(start_paused = true)]
async fn client_builder_attempt_timeouts_per_request() {
    let client = ClientBuilder::new().without_retry().build(slow(45));
    // The default 30 s cuts a 45 s answer.
    let start = tokio::time::Instant::now();
    let err = client.clone().oneshot(get(URL)).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert!(
        err.to_string().contains("the attempt timed out after 30s"),
        "{err}"
    );
    // A request may go without.
    let mut r = get(URL);
    r.extensions_mut()
        .insert(CallOptions::new().without_attempt_timeout());
    assert_eq!(client.clone().oneshot(r).await.unwrap().status(), 200);
    // Or set its own.
    let mut r = get(URL);
    r.extensions_mut()
        .insert(CallOptions::new().with_attempt_timeout(Duration::from_secs(2)));
    let start = tokio::time::Instant::now();
    let err = client.clone().oneshot(r).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert!(err.to_string().contains("after 2s"), "{err}");
    // The builder's own setting.
    let client = ClientBuilder::new()
        .without_retry()
        .with_attempt_timeout(Duration::from_secs(50))
        .build(slow(45));
    assert_eq!(client.oneshot(get(URL)).await.unwrap().status(), 200);
    let client = ClientBuilder::new()
        .without_retry()
        .without_attempt_timeout()
        .build(slow(100));
    assert_eq!(client.oneshot(get(URL)).await.unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn without_retry_is_one_attempt() {
    let (svc, seen) = api(|_, _| Ok(status(503)));
    let client = ClientBuilder::new().without_retry().build(svc);
    assert_eq!(client.oneshot(get(URL)).await.unwrap().status(), 503);
    assert_eq!(seen.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn key_layer_accessors_and_methods() {
    let l = IdempotencyKeyLayer::new()
        .with_header(http::HeaderName::from_static("x-k"))
        .with_methods([http::Method::PUT]);
    assert_eq!(l.header(), "x-k");
    let (svc, seen) = api(|_, _| Ok(status(200)));
    let s = l.layer(svc);
    let _ = s.get_ref();
    let s2 = s.clone().into_inner();
    let _ = s2;
    s.clone().oneshot(req("PUT", URL)).await.unwrap();
    s.oneshot(post(URL, "{}")).await.unwrap();
    assert!(seen.get(0).headers.contains_key("x-k"));
    assert!(!seen.get(1).headers.contains_key("x-k"));
}

#[derive(Clone)]
struct App {
    client: Client<Full<Bytes>>,
}

#[tokio::test]
async fn the_client_lives_in_axum_state() {
    let (svc, seen) = api(|_, _| Ok(status(200)));
    let app_state = App {
        client: ClientBuilder::new().build(svc),
    };
    let shared = Arc::new(app_state.clone());
    let router: axum::Router = axum::Router::new()
        .route(
            "/proxy",
            axum_get(|State(app): State<App>| async move {
                let res = app.client.oneshot(get(URL)).await.unwrap();
                res.status().as_u16().to_string()
            }),
        )
        .with_state(app_state);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let r = router.clone();
        tasks.push(tokio::spawn(
            r.oneshot(
                Request::get("/proxy")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            ),
        ));
        let s = shared.clone();
        tasks.push(tokio::spawn(async move {
            let res = s.client.clone().oneshot(get(URL)).await.unwrap();
            Ok(axum::response::IntoResponse::into_response(res.status()))
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(seen.len(), 20);
}

/// An axum app with the server idempotency layer and a handler that takes `ms`, served on
/// loopback; the handler's run count.
async fn slow_orders(ms: u64) -> (String, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = axum::Router::new()
        .route(
            "/orders",
            axum_post(move |body: String| {
                let r = r.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    r.fetch_add(1, Ordering::SeqCst);
                    (http::StatusCode::CREATED, format!("order for {body}"))
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}/orders"), runs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_timeout_mid_handler_ends_with_the_stored_response() {
    let (url, runs) = slow_orders(300).await;
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_seed(3)
                .with_max_attempts(6)
                .with_backoff(
                    Backoff::decorrelated_jitter(
                        Duration::from_millis(5),
                        Duration::from_millis(20),
                    )
                    .unwrap(),
                ),
        )
        .with_attempt_timeout(Duration::from_millis(100))
        .build(sturdy_chaos::http_client());
    let start = tokio::time::Instant::now();
    let res = client
        .oneshot(Request::post(url).body(Full::from("book")).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "order for book");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_409_past_the_deadline_is_returned_with_its_report() {
    let (url, runs) = slow_orders(2000).await;
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_seed(3)
                .with_deadline(Duration::from_millis(800))
                .with_backoff(
                    Backoff::decorrelated_jitter(
                        Duration::from_millis(5),
                        Duration::from_millis(20),
                    )
                    .unwrap(),
                ),
        )
        .with_attempt_timeout(Duration::from_millis(100))
        .build(sturdy_chaos::http_client());
    let res: Result<_, BoxError> = client
        .oneshot(Request::post(url).body(Full::from("pen")).unwrap())
        .await;
    let res = res.unwrap();
    assert_eq!(res.status(), 409);
    let report = res.extensions().get::<CallReport>().expect("a CallReport");
    assert_eq!(report.delivery(), Delivery::MaybeProcessed);
    assert!(report.idempotency_key().is_some());
    assert!(report.attempts() >= 2);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
