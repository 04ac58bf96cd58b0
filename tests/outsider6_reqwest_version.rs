//! Outside tests of sturdy-reqwest (docs/guides/reqwest.md) and sturdy-version
//! (docs/guides/version.md): where the middleware sits in a reqwest-middleware chain, the
//! extensions a call ends with, redirect loops, requests reqwest cannot build, the buffer limit
//! and 307, the final URL; version pins on odd requests and notices. Loopback, real time.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::IntoResponse;
use axum::routing::{any, get};
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use reqwest_middleware::{Next, Result as MwResult};
use sturdy::core::{classify, Delivery, ErrorKind};
use sturdy::reqwest::{delivery, find, ReqwestService, SturdyMiddleware};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::version::VersionLayer;
use sturdy::ClientBuilder;
use tower::{Layer, ServiceExt};

async fn serve(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new().with_seed(3).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10)).unwrap(),
    )
}

/// A server that answers 503 to the first `fails` requests to `/flaky`, then 200; loops
/// redirects at `/loop`; redirects `/a` to `/b`; 307s `/upload` to `/sink`, which echoes the body.
async fn server(fails: usize) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let h2 = hits.clone();
    let app = Router::new()
        .route(
            "/flaky",
            any(move || {
                let h = h.clone();
                async move {
                    if h.fetch_add(1, Ordering::SeqCst) < fails {
                        StatusCode::SERVICE_UNAVAILABLE.into_response()
                    } else {
                        "ok".into_response()
                    }
                }
            }),
        )
        .route(
            "/loop",
            any(move || {
                let h = h2.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::FOUND, [("location", "/loop")]).into_response()
                }
            }),
        )
        .route(
            "/a",
            get(|| async { (StatusCode::FOUND, [("location", "/b")]).into_response() }),
        )
        .route("/b", get(|| async { "b" }))
        .route(
            "/upload",
            any(|| async {
                (StatusCode::TEMPORARY_REDIRECT, [("location", "/sink")]).into_response()
            }),
        )
        .route("/sink", any(|body: Bytes| async move { body }));
    (serve(app).await, hits)
}

/// Which attempt of a call this is, as a middleware after sturdy numbers them.
#[derive(Clone, Debug, PartialEq)]
struct AttemptNo(usize);

static BEFORE: AtomicUsize = AtomicUsize::new(0);
static AFTER: AtomicUsize = AtomicUsize::new(0);
static ENDED_WITH: Mutex<Option<AttemptNo>> = Mutex::new(None);

fn before<'a>(
    req: reqwest::Request,
    ext: &'a mut http::Extensions,
    next: Next<'a>,
) -> futures_util::future::BoxFuture<'a, MwResult<reqwest::Response>> {
    Box::pin(async move {
        BEFORE.fetch_add(1, Ordering::SeqCst);
        let r = next.run(req, ext).await;
        *ENDED_WITH.lock().unwrap() = ext.get::<AttemptNo>().cloned();
        r
    })
}

fn after<'a>(
    req: reqwest::Request,
    ext: &'a mut http::Extensions,
    next: Next<'a>,
) -> futures_util::future::BoxFuture<'a, MwResult<reqwest::Response>> {
    Box::pin(async move {
        let n = AFTER.fetch_add(1, Ordering::SeqCst) + 1;
        ext.insert(AttemptNo(n));
        next.run(req, ext).await
    })
}

/// reqwest.md: "Middlewares added before it see each call once; middlewares added after it see
/// every attempt", and "when the call ends, the call's extensions are replaced by those of the
/// last attempt that finished."
#[tokio::test]
async fn middlewares_before_see_calls_after_see_attempts_and_the_last_attempts_extensions_win() {
    let (base, hits) = server(2).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(before)
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .with(after)
        .build();
    let res = client.get(format!("{base}/flaky")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert_eq!(BEFORE.load(Ordering::SeqCst), 1);
    assert_eq!(AFTER.load(Ordering::SeqCst), 3);
    assert_eq!(*ENDED_WITH.lock().unwrap(), Some(AttemptNo(3)));
}

/// reqwest.md: "`is_redirect()`: too many redirects | `Other` | maybe | no" and the words "could
/// not follow a redirect: too many redirects". Not retried: one attempt is 11 requests (the
/// first and 10 redirects).
#[tokio::test]
async fn a_redirect_loop_is_other_maybe_processed_and_not_retried() {
    let (base, _) = server(0).await;
    let loops = Arc::new(AtomicUsize::new(0));
    let app_hits = loops.clone();
    let _ = app_hits;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .build();
    let err = client.get(format!("{base}/loop")).send().await.unwrap_err();
    let words = err.to_string();
    eprintln!("redirect loop: {words}");
    assert!(
        words.contains("could not follow a redirect: too many redirects"),
        "{words}"
    );
    let e = find::<sturdy::core::Error>(&err).expect("a sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Other);
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert!(e.report().is_none_or(|r| r.attempts() == 1), "{words}");
}

/// reqwest.md: "`is_builder()`: a URL or header reqwest cannot use | `Config` | no (`NotSent`) |
/// no", words "invalid request: ...". Through `ReqwestService` a request whose URI has no scheme
/// or host (an `http::Request` allows it).
#[tokio::test]
async fn a_request_reqwest_cannot_build_is_config_not_sent_and_not_retried() {
    let http = ReqwestService::new(reqwest::Client::new());
    let req = Request::get("/relative/only")
        .body(Full::<Bytes>::default())
        .unwrap();
    let err = http.clone().oneshot(req).await.unwrap_err();
    eprintln!("builder: {err}");
    assert_eq!(err.kind(), &ErrorKind::Config, "{err}");
    assert!(err.to_string().starts_with("invalid request"), "{err}");
    assert_eq!(classify::delivery(&err), Delivery::NotSent);
    let client = ClientBuilder::new().with_retry(quick_retry()).build(http);
    let req = Request::get("/relative/only")
        .body(Full::<Bytes>::default())
        .unwrap();
    let err = client.oneshot(req).await.unwrap_err();
    let e = err.downcast_ref::<sturdy::core::Error>().unwrap();
    assert_eq!(e.report().map_or(1, |r| r.attempts()), 1, "{err}");
    assert_eq!(classify::delivery(&*err), Delivery::NotSent);
}

/// reqwest.md: a body of known size "at most `with_buffer_limit` \[1 MiB\] is handed to reqwest
/// as bytes, so reqwest can send it again when it follows a 307 or 308 redirect; any other body
/// is streamed, and reqwest answers a 307 or 308 for it with the redirect response itself."
#[tokio::test]
async fn a_body_over_the_buffer_limit_gets_the_307_itself() {
    let (base, _) = server(0).await;
    let http = ReqwestService::new(reqwest::Client::new()).with_buffer_limit(4);
    let req = Request::post(format!("{base}/upload"))
        .body(Full::new(Bytes::from_static(b"0123456789")))
        .unwrap();
    let res = http.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT);
    // Within the limit, followed with the body.
    let http = ReqwestService::new(reqwest::Client::new()).with_buffer_limit(10);
    let req = Request::post(format!("{base}/upload"))
        .body(Full::new(Bytes::from_static(b"0123456789")))
        .unwrap();
    let res = http.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "0123456789");
}

/// reqwest.md: "The response is a `reqwest::Response` whose `url()` is the URL it came from".
#[tokio::test]
async fn the_response_url_is_the_final_one_after_a_redirect() {
    let (base, _) = server(0).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().build(next)
        }))
        .build();
    let res = client.get(format!("{base}/a")).send().await.unwrap();
    assert_eq!(res.url().path(), "/b");
    assert_eq!(res.text().await.unwrap(), "b");
}

/// The middleware client is `Clone + Send + Sync`, and a `ReqwestService` stack kept and driven
/// under `Buffer(1)` and `ConcurrencyLimit(1)` answers every call.
#[tokio::test]
async fn a_kept_reqwest_stack_under_buffer_and_a_limit_of_one() {
    use tower::Service;
    fn assert_send_sync_clone<T: Send + Sync + Clone>(_: &T) {}
    let (base, _) = server(0).await;
    let mw = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().build(next)
        }))
        .build();
    assert_send_sync_clone(&mw);
    let mut svc = tower::ServiceBuilder::new()
        .buffer(1)
        .concurrency_limit(1)
        .service(ClientBuilder::new().build(ReqwestService::new(reqwest::Client::new())));
    for _ in 0..10 {
        let req = Request::get(format!("{base}/b"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let res =
            tokio::time::timeout(Duration::from_secs(2), svc.ready().await.unwrap().call(req))
                .await
                .expect("a kept call hung")
                .unwrap();
        res.into_body().collect().await.unwrap();
    }
}

// ===== versions =====

fn echo_api() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(|req: Request<Full<Bytes>>| async move {
        let v = req
            .headers()
            .get_all("api-version")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join("|");
        let q = req.uri().query().unwrap_or("").to_owned();
        let mut res = Response::new(Full::from(format!("{v};{q}")));
        res.headers_mut()
            .insert("deprecation", "@1700000000".parse().unwrap());
        Ok(res)
    })
}

async fn text(res: Response<Full<Bytes>>) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// version.md: "pins the version on every request (a version the caller set is kept)": a caller
/// that set the header in another case of name, or twice, keeps exactly what it set.
#[tokio::test]
async fn a_callers_version_header_is_kept_as_set() {
    let svc = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .layer(echo_api());
    let res = svc
        .clone()
        .oneshot(
            Request::get("http://api.example.com/x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(text(res).await, "2024-06-01;");
    let res = svc
        .clone()
        .oneshot(
            Request::get("http://api.example.com/x")
                .header("API-Version", "2023-01-01")
                .header("api-version", "2023-02-02")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(text(res).await, "2023-01-01|2023-02-02;");
}

/// `VersionLayer::query`: pinned in the query of a URI without one, after an existing one,
/// and kept when the caller set it (even empty).
#[tokio::test]
async fn a_query_version_is_added_once_and_the_callers_is_kept() {
    let svc = VersionLayer::query("api-version", "2024-06-01").layer(echo_api());
    for (uri, expect) in [
        ("http://api.example.com/x", ";api-version=2024-06-01"),
        (
            "http://api.example.com/x?a=1",
            ";a=1&api-version=2024-06-01",
        ),
        ("http://api.example.com/x?api-version=1", ";api-version=1"),
        ("http://api.example.com/x?api-version=", ";api-version="),
        (
            "http://api.example.com/x?a=1&api-version=2",
            ";a=1&api-version=2",
        ),
    ] {
        let res = svc
            .clone()
            .oneshot(Request::get(uri).body(Full::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(text(res).await, expect, "{uri}");
    }
}

/// version.md: reported "once per endpoint ... An endpoint is the method and the path, ids
/// included": a GET and a DELETE of one path are two endpoints, two query strings of one path are
/// one; the layer is `Clone + Send + Sync` and its clones share what was reported.
#[tokio::test]
async fn notices_are_once_per_method_and_path_across_clones() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>(_: &T) {}
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let layer = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .on_notice(move |n| s.lock().unwrap().push(format!("{n:?}")));
    let svc = layer.layer(echo_api());
    assert_send_sync_clone(&svc);
    for (m, uri) in [
        ("GET", "http://api.example.com/orders/1?a=1"),
        ("GET", "http://api.example.com/orders/1?a=2"),
        ("DELETE", "http://api.example.com/orders/1"),
        ("GET", "http://api.example.com/orders/2"),
        ("GET", "http://api.example.com/orders/1"),
    ] {
        svc.clone()
            .oneshot(
                Request::builder()
                    .method(m)
                    .uri(uri)
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "{seen:#?}");
}
