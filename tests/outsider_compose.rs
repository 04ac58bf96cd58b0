//! Outside tests: the composed `ClientBuilder` client under tower's Buffer, ConcurrencyLimit(1),
//! GlobalConcurrencyLimit and tower-http layers, driven by `oneshot` and by a kept service, with
//! futures dropped at the waiting points.
use crate::outsider_common;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use outsider_common::*;
use sturdy::auth::AuthLayer;
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::{find, BoxError, CallOptions};
use sturdy::hedge::HedgeLayer;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::version::VersionLayer;
use sturdy::{Client, ClientBuilder};
use tokio::time::Instant;
use tower::limit::{ConcurrencyLimitLayer, GlobalConcurrencyLimitLayer};
use tower::{Service, ServiceBuilder, ServiceExt};

const U: &str = "http://api.example.com/x";

fn assert_shareable<T: Clone + Send + Sync + 'static>(_: &T) {}

fn retry() -> RetryLayer {
    RetryLayer::new().with_seed(7).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(100), Duration::from_millis(400))
            .unwrap(),
    )
}

fn full_client(api: &Api) -> Client<Full<Bytes>> {
    ClientBuilder::new()
        .with_retry(retry())
        .with_hedge(HedgeLayer::new().with_min_samples(5))
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_auth(AuthLayer::bearer("tkn").unwrap())
        .with_version(VersionLayer::header("api-version", "2024-06-01").unwrap())
        .build(
            ServiceBuilder::new()
                .layer(ConcurrencyLimitLayer::new(1))
                .service(api.service()),
        )
}

async fn kept_calls(mut svc: Client<Full<Bytes>>, n: usize) -> Vec<Result<u16, String>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = match svc.ready().await {
            Ok(s) => s.call(get(U)).await,
            Err(e) => Err(e),
        };
        out.push(r.map(|r| r.status().as_u16()).map_err(|e| e.to_string()));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn the_client_is_shareable_and_works_in_spawned_tasks() {
    let api = Api::new(vec![], ok());
    let client = full_client(&api);
    assert_shareable(&client);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.oneshot(get(U)).await.map(|r| r.status())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    let seen = api.seen();
    assert!(seen
        .iter()
        .all(|s| s.headers.get("authorization").unwrap() == "Bearer tkn"));
    assert!(seen
        .iter()
        .all(|s| s.headers.get("api-version").unwrap() == "2024-06-01"));
}

#[tokio::test(start_paused = true)]
async fn kept_service_over_concurrency_limit_one_through_retries_and_pauses() {
    let api = Api::new(
        vec![
            status(503),
            status_h(429, &[("retry-after", "2")]),
            Answer::Io(std::io::ErrorKind::ConnectionReset),
            ok(),
            status(502),
        ],
        ok(),
    );
    let client = full_client(&api);
    let out = tokio::time::timeout(Duration::from_secs(120), kept_calls(client, 6))
        .await
        .expect("deadlock");
    assert!(out.iter().all(|r| r == &Ok(200)), "{out:?}");
}

#[tokio::test(start_paused = true)]
async fn a_kept_service_survives_dropped_calls_at_every_wait() {
    // 1: a call dropped while the retry sleeps; 2: dropped while waiting for a pause;
    // 3: dropped while the inner call hangs. After each, a fresh call must go through.
    let api = Api::new(vec![status_h(503, &[("retry-after", "5")])], ok());
    let mut client = full_client(&api);
    let fut = client.ready().await.unwrap().call(get(U));
    assert!(tokio::time::timeout(Duration::from_secs(1), fut)
        .await
        .is_err());
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        client.ready().await.unwrap().call(get(U)).await
    })
    .await
    .expect("stuck after a dropped sleeping retry");
    assert_eq!(r.unwrap().status(), 200);

    api.push(status_h(429, &[("retry-after", "3")]));
    let mut req = get(U);
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    // A 429 with Retry-After and no attempt left is an error carrying RateLimited (retry guide).
    let err = client.ready().await.unwrap().call(req).await.unwrap_err();
    assert!(find::<sturdy::core::RateLimited>(&*err).is_some());
    let fut = client.ready().await.unwrap().call(get(U));
    assert!(tokio::time::timeout(Duration::from_secs(1), fut)
        .await
        .is_err());
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        client.ready().await.unwrap().call(get(U)).await
    })
    .await
    .expect("stuck after a dropped pause waiter");
    assert_eq!(r.unwrap().status(), 200);

    api.push(Answer::Hang);
    let fut = client.ready().await.unwrap().call(get(U));
    assert!(tokio::time::timeout(Duration::from_secs(1), fut)
        .await
        .is_err());
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        client.ready().await.unwrap().call(get(U)).await
    })
    .await
    .expect("stuck after a dropped hanging call");
    assert_eq!(r.unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn under_buffer_one_with_concurrent_callers_and_retries() {
    let api = Api::new(
        vec![status(503), status(503), status(503)],
        Answer::Slow(Duration::from_millis(10)),
    );
    let client = full_client(&api);
    let buffered = tower::buffer::Buffer::new(client, 1);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let b = buffered.clone();
        // (An async block around a Buffer's oneshot hits a rustc higher-ranked lifetime limit
        // with plain tower too; spawn the future itself.)
        tasks.push(tokio::spawn(b.oneshot(get(U))));
    }
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("stuck");
        assert_eq!(r.unwrap().unwrap().status(), 200);
    }
}

#[tokio::test(start_paused = true)]
async fn global_concurrency_limit_below_and_above() {
    let api = Api::new(vec![status(503)], Answer::Slow(Duration::from_millis(10)));
    let client = ClientBuilder::new().with_retry(retry()).build(
        ServiceBuilder::new()
            .layer(GlobalConcurrencyLimitLayer::new(2))
            .service(api.service()),
    );
    let above = ServiceBuilder::new()
        .layer(GlobalConcurrencyLimitLayer::new(3))
        .service(client);
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let b = above.clone();
        tasks.push(tokio::spawn(async move {
            b.oneshot(get(U)).await.map(|r| r.status())
        }));
    }
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("stuck");
        assert_eq!(r.unwrap().unwrap(), 200);
    }
}

#[tokio::test(start_paused = true)]
async fn tower_http_layers_around_and_below() {
    use http::header::{HeaderName, HeaderValue};
    use tower_http::set_header::SetRequestHeaderLayer;
    let api = Api::new(vec![Answer::Hang], ok());
    // tower-http's TimeoutLayer answers 408 below the client: the retry layer retries it.
    #[allow(deprecated)]
    let below = ServiceBuilder::new()
        .layer(SetRequestHeaderLayer::overriding(
            HeaderName::from_static("x-below"),
            HeaderValue::from_static("1"),
        ))
        .layer(tower_http::timeout::TimeoutLayer::new(Duration::from_secs(
            1,
        )))
        .service(api.service());
    let client = ClientBuilder::new().with_retry(retry()).build(below);
    let above = ServiceBuilder::new()
        .layer(SetRequestHeaderLayer::overriding(
            HeaderName::from_static("x-above"),
            HeaderValue::from_static("1"),
        ))
        .service(client);
    let res = above.oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|s| s.headers.contains_key("x-above") && s.headers.contains_key("x-below")));
}

#[tokio::test(start_paused = true)]
async fn coalescing_client_shares_and_survives_a_dropped_leader() {
    let api = Api::new(vec![Answer::Slow(Duration::from_secs(1))], ok());
    let (coalesce, handle) = CoalesceLayer::new().pair();
    let client = ClientBuilder::new()
        .with_retry(retry())
        .with_coalesce(coalesce)
        .build(api.service());
    assert_shareable(&client);
    let leader = tokio::spawn(client.clone().oneshot(get(U)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let follower = tokio::spawn(client.clone().oneshot(get(U)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    leader.abort();
    let res = follower.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(api.calls(), 1);
    assert_eq!(handle.stats().joined(), 1);
    // A later identical call starts afresh.
    client.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(api.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn in_axum_state() {
    use axum::extract::State;
    use axum::routing::get as aget;
    let api = Api::new(vec![], ok());
    let client = full_client(&api);
    let app: axum::Router = axum::Router::new()
        .route(
            "/proxy",
            aget(|State(c): State<Client<Full<Bytes>>>| async move {
                c.oneshot(get(U))
                    .await
                    .map(|r| r.status().as_u16().to_string())
                    .unwrap_or_else(|e| e.to_string())
            }),
        )
        .with_state(client);
    let res = app
        .oneshot(
            Request::get("/proxy")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"200");
}

/// The default stack's attempt timeout is 30 s; a per-request one wins; and without_attempt_timeout
/// in CallOptions lets a slow request run past it.
#[tokio::test(start_paused = true)]
async fn attempt_timeouts() {
    let api = Api::new(vec![], Answer::Slow(Duration::from_secs(40)));
    let client = ClientBuilder::new()
        .with_retry(retry().with_max_attempts(1))
        .build(api.service());
    let start = Instant::now();
    let err = client.clone().oneshot(get(U)).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    eprintln!("timeout: {err}");
    let mut req = get(U);
    req.extensions_mut()
        .insert(CallOptions::new().with_attempt_timeout(Duration::from_secs(2)));
    let start = Instant::now();
    let _ = client.clone().oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    let mut req = get(U);
    req.extensions_mut()
        .insert(CallOptions::new().without_attempt_timeout());
    assert_eq!(client.clone().oneshot(req).await.unwrap().status(), 200);
}

/// The client's error type is BoxError and errors say what to do: an attempt timeout on a POST.
#[tokio::test(start_paused = true)]
async fn post_timeouts_name_the_key() {
    let api = Api::new(vec![], Answer::Hang);
    let client = ClientBuilder::new()
        .with_retry(retry())
        .with_attempt_timeout(Duration::from_secs(1))
        .build(api.service());
    let err: BoxError = client
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap_err();
    let e = find::<sturdy::core::Error>(&*err).unwrap();
    let key = e.idempotency_key().expect("key").to_owned();
    assert!(err.to_string().contains(&key), "{err}");
    assert_eq!(api.calls(), 4);
    eprintln!("{err}");
}

#[allow(dead_code)]
fn _types(_: Response<Full<Bytes>>) {}

/// Composition: a custom idempotency header in the builder. The idempotency guide says
/// `.with_header(name)` changes the header, and `ClientBuilder` promises "one idempotency key for
/// all retries": the builder tells the retry layer, so a POST that carries a key in the
/// configured header is retried (it once came back with a 503 after one attempt).
#[tokio::test(start_paused = true)]
async fn a_custom_idempotency_header_keeps_posts_retryable() {
    use sturdy::idempotency::client::IdempotencyKeyLayer;
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_idempotency(
            IdempotencyKeyLayer::new().with_header(http::HeaderName::from_static("x-request-key")),
        )
        .with_retry(retry())
        .build(api.service());
    let res = client
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap();
    let seen = api.seen();
    assert!(seen[0].headers.contains_key("x-request-key"));
    assert_eq!(
        (res.status().as_u16(), seen.len()),
        (200, 2),
        "a POST with a key in the configured header was not retried"
    );
}

#[tokio::test(start_paused = true)]
async fn a_custom_idempotency_header_set_on_both_layers_works() {
    use sturdy::idempotency::client::IdempotencyKeyLayer;
    let h = http::HeaderName::from_static("x-request-key");
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_idempotency(IdempotencyKeyLayer::new().with_header(h.clone()))
        .with_retry(retry().with_idempotency_header(h))
        .build(api.service());
    let res = client
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap();
    assert_eq!((res.status().as_u16(), api.calls()), (200, 2));
}

/// A 429 storm: the server answers 429 (Retry-After: 1) for 5 s, then 200. Fifty concurrent
/// callers with a deadline of 30 s all get through, and the server does not see a stampede.
#[tokio::test(start_paused = true)]
async fn a_429_storm_is_ridden_out() {
    let start = Instant::now();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    let api = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let storm = start.elapsed() < Duration::from_secs(5);
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let res = if storm {
                Response::builder()
                    .status(429)
                    .header("retry-after", "1")
                    .body(Full::<Bytes>::default())
                    .unwrap()
            } else {
                Response::new(Full::<Bytes>::from("ok"))
            };
            Ok::<_, BoxError>(res)
        }
    });
    let client = ClientBuilder::new()
        .with_retry(
            retry()
                .with_deadline(Duration::from_secs(30))
                .with_max_attempts(10),
        )
        .build(api);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(tokio::spawn(client.clone().oneshot(get(U))));
    }
    let mut failed = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => assert_eq!(r.status(), 200),
            Err(e) => failed.push(e.to_string()),
        }
    }
    let n = hits.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "storm: {n} requests for 50 calls, {} failed, done after {:?}",
        failed.len(),
        start.elapsed()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(n <= 120, "{n} requests at the server");
}

/// A 503 storm with every layer on: the retry budget bounds what the server sees.
#[tokio::test(start_paused = true)]
async fn a_503_storm_is_bounded_by_the_budget() {
    let api = Api::new(vec![], after(Duration::from_millis(10), status(503)));
    let client = ClientBuilder::new()
        .with_retry(retry())
        .build(api.service());
    let mut tasks = Vec::new();
    for _ in 0..200 {
        tasks.push(tokio::spawn(client.clone().oneshot(get(U))));
    }
    for t in tasks {
        let _ = t.await.unwrap();
    }
    let n = api.calls();
    eprintln!("503 storm: {n} requests for 200 calls");
    assert!(n <= 200 + 40 + 20 + 100, "{n}");
}

/// Auth over ConcurrencyLimit(1): a call waiting for a slow token holds the permit; dropping it
/// gives the permit back.
#[tokio::test(start_paused = true)]
async fn a_dropped_token_wait_gives_back_the_permit() {
    use sturdy::auth::ClientCredentials;
    let tokens = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(
            r#"{"access_token":"t","expires_in":3600}"#,
        )))
    });
    let src = ClientCredentials::new(tokens, "https://auth.example.com/token", "c", "s").unwrap();
    let api = Api::new(vec![], ok());
    let mut svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(src))
        .concurrency_limit(1)
        .service(api.service());
    let fut = svc.ready().await.unwrap().call(get(U));
    assert!(tokio::time::timeout(Duration::from_secs(1), fut)
        .await
        .is_err());
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        svc.ready().await.unwrap().call(get(U)).await
    })
    .await;
    assert!(r.expect("permit leaked by a dropped token wait").is_ok());
}

/// The rate-limit guide: "Zero max_wait: never wait" (an interactive layer). Inside the composed
/// client, what does a call that finds no slot do?
#[tokio::test(start_paused = true)]
async fn zero_max_wait_inside_the_builder() {
    use sturdy::ratelimit::{Quota, RateLimitLayer};
    let api = Api::new(vec![], ok());
    let client = ClientBuilder::new()
        .with_rate_limit(
            RateLimitLayer::new(Quota::per_second(1).unwrap()).with_max_wait(Duration::ZERO),
        )
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let start = Instant::now();
    let r = client.clone().oneshot(get(U)).await;
    eprintln!(
        "second call: {:?} after {:?}",
        r.as_ref().map(|r| r.status()).map_err(ToString::to_string),
        start.elapsed()
    );
}
