//! "Every layer keeps tower's readiness contract": the whole client and layers alone over a
//! `ConcurrencyLimit(1)`, driven by a kept `ready().await?.call(req)` in a loop, with retries;
//! cursor keys; rate limits found through the reqwest middleware.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::core::{BoxError, ErrorKind, RateLimited};
use sturdy::paginate::{JsonCursor, Paginate};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::version::VersionLayer;
use sturdy::ClientBuilder;
use tower::limit::ConcurrencyLimit;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

/// Answers 503 to every third request, else 200.
fn flaky(
    hits: Arc<AtomicUsize>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_req: Request<Full<Bytes>>| {
        let n = hits.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let status = if n.is_multiple_of(3) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::from("x"))
                    .unwrap(),
            )
        }
    })
}

fn retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(1), Duration::from_millis(5))
                .unwrap(),
        )
        .with_seed(9)
}

fn get() -> Request<Full<Bytes>> {
    Request::get("http://api.example.com/x")
        .body(Full::default())
        .unwrap()
}

fn post() -> Request<Full<Bytes>> {
    Request::post("http://api.example.com/orders")
        .body(Full::from("{}"))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn agents27_kept_client_over_concurrency_limit_one_with_retries() {
    let hits = Arc::new(AtomicUsize::new(0));
    let http = ConcurrencyLimit::new(flaky(hits.clone()), 1);
    let mut client = ClientBuilder::new()
        .with_retry(retry())
        .with_version(VersionLayer::header("api-version", "1").unwrap())
        .build(http);
    for i in 0..12 {
        let req = if i % 2 == 0 { get() } else { post() };
        let res = tokio::time::timeout(Duration::from_secs(30), async {
            client.ready().await?.call(req).await
        })
        .await
        .unwrap_or_else(|_| panic!("call {i} deadlocked"))
        .unwrap();
        assert_eq!(res.status(), 200);
    }
    // Clones of the same client at once, over the same limit.
    let calls = (0..8).map(|i| {
        let c = client.clone();
        async move {
            let req = if i % 2 == 0 { get() } else { post() };
            c.oneshot(req).await
        }
    });
    let all = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("deadlock");
    for r in all {
        assert_eq!(r.unwrap().status(), 200);
    }
}

#[tokio::test(start_paused = true)]
async fn agents27_kept_retry_layer_alone_over_concurrency_limit_one() {
    let hits = Arc::new(AtomicUsize::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(retry().with_max_attempts(5))
        .concurrency_limit(1)
        .service(flaky(hits.clone()));
    for i in 0..12 {
        let res = tokio::time::timeout(Duration::from_secs(30), async {
            svc.ready().await?.call(get()).await
        })
        .await
        .unwrap_or_else(|_| panic!("call {i} deadlocked"));
        let res: Response<_> = res.map_err(|e: BoxError| e).unwrap();
        assert_eq!(res.status(), 200);
    }
}

#[tokio::test(start_paused = true)]
async fn agents27_ready_then_dropped_without_call_frees_the_permit() {
    let hits = Arc::new(AtomicUsize::new(0));
    let http = ConcurrencyLimit::new(flaky(hits.clone()), 1);
    let client = ClientBuilder::new().with_retry(retry()).build(http);
    // Made ready, then dropped without a call: the permit must come back.
    let mut a = client.clone();
    tokio::time::timeout(Duration::from_secs(5), a.ready())
        .await
        .expect("first ready")
        .unwrap();
    drop(a);
    let res = tokio::time::timeout(Duration::from_secs(5), client.clone().oneshot(get()))
        .await
        .expect("the permit of a dropped ready service was not returned")
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn agents27_cursor_key_rules() {
    let api = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(
            r#"{"data":[1],"next":null}"#,
        )))
    });
    let short = Paginate::builder(api, "http://h/items", JsonCursor::new("/data", "/next"))
        .with_cursor_key([7u8; 31])
        .build()
        .unwrap_err();
    assert_eq!(short.kind(), &ErrorKind::Config, "{short}");
    let key = "k3y-that-must-stay-hidden-0123456789";
    let pager = Paginate::builder(api, "http://h/items", JsonCursor::new("/data", "/next"))
        .with_cursor_key(key)
        .build()
        .unwrap();
    assert!(!format!("{pager:?}").contains("k3y-that"), "{pager:?}");
    for bad in ["h/items", "/items", "", "http://", "not a uri"] {
        let e = Paginate::new(api, bad, JsonCursor::new("/data", "/next")).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Config, "{bad}: {e}");
    }
    let e = Paginate::new(api, "http://h/items", JsonCursor::new("data", "/next")).unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config, "{e}");
    let e = Paginate::builder(api, "http://h/items", JsonCursor::new("/data", "/next"))
        .with_page_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config, "{e}");
}

#[tokio::test]
async fn agents27_rate_limit_found_through_the_middleware() {
    use axum::routing::get as route_get;
    let app = axum::Router::new().route(
        "/x",
        route_get(|| async {
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "120")],
                "no",
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(sturdy_reqwest::SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(retry()).build(next)
        }))
        .build();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        client.get(format!("http://{addr}/x?api_key=SECRET")).send(),
    )
    .await
    .expect("hung")
    .unwrap_err();
    let rl = sturdy_reqwest::find::<RateLimited>(&err).expect("a RateLimited in the chain");
    assert_eq!(rl.retry_after(), Duration::from_secs(120));
    assert!(err.to_string().contains("retry after 2m"), "{err}");
    assert!(!format!("{err} {err:?}").contains("SECRET"));
}

#[tokio::test]
async fn agents27_tool_result_of_a_rate_limit_through_the_middleware() {
    use axum::routing::get as route_get;
    let app = axum::Router::new().route(
        "/x",
        route_get(|| async {
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "120")],
                "no",
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(sturdy_reqwest::SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(retry()).build(next)
        }))
        .build();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        client.get(format!("http://{addr}/x")).send(),
    )
    .await
    .expect("hung")
    .unwrap_err();
    let out = sturdy::core::summary::tool_result::<serde_json::Value>(Err(BoxError::from(err)));
    let e = &out["structuredContent"]["error"];
    assert_eq!(e["kind"], "rate_limited", "{out}");
    assert_eq!(e["retry_after_ms"], 120_000, "{out}");
    let text = out["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("Try again in 2m"), "{text}");
}
