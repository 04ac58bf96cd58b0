//! What reqwest code sees through `SturdyMiddleware` and `ReqwestService` on the wire:
//! repeated and non-UTF-8 headers both ways, HEAD and 204 answers, redirects, and credentials
//! in a URL kept out of errors.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use sturdy_reqwest::{ReqwestService, SturdyMiddleware};
use tower::ServiceExt;

async fn echo_headers(headers: HeaderMap) -> impl IntoResponse {
    let tags: Vec<String> = headers
        .get_all("x-tag")
        .iter()
        .map(|v| format!("{:?}", v.as_bytes()))
        .collect();
    let mut out = HeaderMap::new();
    out.append("set-cookie", HeaderValue::from_static("a=1"));
    out.append("set-cookie", HeaderValue::from_static("b=2"));
    out.append("x-raw", HeaderValue::from_bytes(b"caf\xe9").unwrap());
    (out, tags.join("|"))
}

async fn server() -> String {
    let app = Router::new()
        .route("/echo", get(echo_headers))
        .route("/empty", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/moved",
            get(|| async { (StatusCode::FOUND, [("location", "/echo?from=moved")]) }),
        )
        .route("/big", get(|| async { "z".repeat(100_000) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn client() -> reqwest_middleware::ClientWithMiddleware {
    let retry = RetryLayer::new().with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10)).unwrap(),
    );
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(retry).build(next)
        }))
        .build()
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("hung")
}

#[tokio::test]
async fn agents27_repeated_and_raw_headers_cross_both_ways() {
    let base = server().await;
    let res = within(
        client()
            .get(format!("{base}/echo"))
            .header("x-tag", "one")
            .header("x-tag", HeaderValue::from_bytes(b"t\xfcwo").unwrap())
            .send(),
    )
    .await
    .unwrap();
    let cookies: Vec<_> = res.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, vec!["a=1", "b=2"]);
    assert_eq!(res.headers()["x-raw"].as_bytes(), b"caf\xe9");
    let body = res.text().await.unwrap();
    assert_eq!(body, "[111, 110, 101]|[116, 252, 119, 111]");
}

#[tokio::test]
async fn agents27_head_and_no_content_answers_do_not_hang() {
    let base = server().await;
    let c = client();
    let res = within(c.head(format!("{base}/big")).send()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(within(res.bytes()).await.unwrap().len(), 0);
    let res = within(c.get(format!("{base}/empty")).send()).await.unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(within(res.bytes()).await.unwrap().len(), 0);
    let res = within(c.get(format!("{base}/big")).send()).await.unwrap();
    assert_eq!(res.content_length(), Some(100_000));
    assert_eq!(within(res.bytes()).await.unwrap().len(), 100_000);
    // Through ReqwestService too.
    let http = ReqwestService::new(reqwest::Client::new());
    let req = http::Request::head(format!("{base}/big"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let res = within(http.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = within(res.into_body().collect()).await.unwrap().to_bytes();
    assert!(body.is_empty());
}

#[tokio::test]
async fn agents27_response_url_is_where_it_came_from() {
    let base = server().await;
    let res = within(client().get(format!("{base}/moved")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.url().path(), "/echo");
    assert_eq!(res.url().query(), Some("from=moved"));
    let addr = res.remote_addr().expect("the peer's address");
    assert!(base.ends_with(&addr.to_string()), "{addr} vs {base}");
}

#[tokio::test]
async fn agents27_credentials_in_the_url_stay_out_of_errors() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = within(
        client()
            .get(format!(
                "http://alice:pa55w0rd@127.0.0.1:{port}/x?token=SECRET#frag-SECRET"
            ))
            .send(),
    )
    .await
    .unwrap_err();
    let mut shown = format!("{err} | {err:?}");
    if let Some(e) = sturdy_reqwest::find::<sturdy::core::Error>(&err) {
        shown += &format!(" | {e} | {e:?}");
    }
    if let Some(e) = sturdy_reqwest::find::<reqwest::Error>(&err) {
        shown += &format!(" | {e} | {e:?}");
    }
    let s = sturdy::core::summary::ErrorSummary::of(&err);
    shown += &serde_json::to_string(&s).unwrap();
    for secret in ["pa55w0rd", "SECRET", "alice"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
}

#[tokio::test]
async fn agents27_a_redirect_loop_is_other_and_not_retried() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = Router::new().route(
        "/loop",
        get(move || {
            h.fetch_add(1, Ordering::SeqCst);
            async { (StatusCode::FOUND, [("location", "/loop?api_key=SECRET")]) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let err = within(client().get(format!("http://{addr}/loop")).send())
        .await
        .unwrap_err();
    assert_eq!(hits.load(Ordering::SeqCst), 11, "{err}");
    let e = sturdy_reqwest::find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &sturdy::core::ErrorKind::Other, "{err}");
    assert!(
        err.to_string()
            .ends_with("could not follow a redirect: too many redirects"),
        "{err}"
    );
    assert!(!format!("{err} {err:?}").contains("SECRET"), "{err:?}");
}

#[tokio::test]
async fn agents27_reqwest_service_refuses_a_relative_uri_as_config() {
    let http = ReqwestService::new(reqwest::Client::new());
    let req = http::Request::get("/relative")
        .body(Full::<Bytes>::default())
        .unwrap();
    let err = within(http.clone().oneshot(req)).await.unwrap_err();
    assert_eq!(err.kind(), &sturdy::core::ErrorKind::Config, "{err}");
    assert_eq!(
        sturdy::core::classify::delivery(&err),
        sturdy::core::Delivery::NotSent
    );
    let client = ClientBuilder::new().build(http);
    let req = http::Request::post("/relative")
        .body(Full::<Bytes>::from("{}"))
        .unwrap();
    let err = within(client.oneshot(req)).await.unwrap_err();
    let s = sturdy::core::summary::ErrorSummary::of(&*err);
    assert_eq!(s.kind, "config", "{s:?}");
    assert!(!s.retryable);
    assert!(!s.may_have_been_processed);
    assert_eq!(s.attempts.unwrap_or(1), 1);
}

#[tokio::test]
async fn agents27_version_pin_through_the_middleware_keeps_reqwest_query() {
    use axum::extract::RawQuery;
    let app = Router::new().route(
        "/q",
        get(|RawQuery(q): RawQuery| async move { q.unwrap_or_default() }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_version(sturdy::version::VersionLayer::query(
                    "api-version",
                    "2024-06-01",
                ))
                .build(next)
        }))
        .build();
    let q = within(
        client
            .get(format!("http://{addr}/q"))
            .query(&[("a", "1 2"), ("b", "&")])
            .send(),
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert_eq!(q, "a=1+2&b=%26&api-version=2024-06-01");
    let q = within(
        client
            .get(format!("http://{addr}/q"))
            .query(&[("api-version", "2023-01-01")])
            .send(),
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert_eq!(q, "api-version=2023-01-01");
}
