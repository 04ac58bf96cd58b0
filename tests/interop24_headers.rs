//! Interop: quota headers, redirects, version pins and streamed bodies against small servers of
//! the test's own on 127.0.0.1:0 (and HAProxy's normal frontend).
use crate::interop_common;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use interop_common::*;
use sturdy::core::{Delivery, ErrorKind, WallClock};
use sturdy::ratelimit::RateLimitLayer;
use sturdy::ClientBuilder;
use sturdy_reqwest::{ReqwestService, SturdyMiddleware};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

const NORMAL: &str = "STURDY_INTEROP_HAPROXY_NORMAL_URL";
const BACKEND: &str = "STURDY_INTEROP_BACKEND_URL";

type Answer = Arc<dyn Fn(usize, &Uri) -> (StatusCode, Vec<(String, String)>) + Send + Sync>;

async fn serve(answer: Answer) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new().fallback(move |uri: Uri, body: Bytes| {
        let answer = answer.clone();
        let counter = counter.clone();
        async move {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let (status, headers) = answer(n, &uri);
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.append(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(&v).unwrap(),
                );
            }
            let text = format!("{{\"uri\":{:?},\"bytes\":{}}}", uri.to_string(), body.len());
            (status, map, text).into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), hits)
}

fn h(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

fn unix_now() -> u64 {
    sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Sends one GET that comes back with `headers` on a 200, then measures how long the next GET
/// through the same adaptive limiter waits.
async fn wait_after(headers: Vec<(String, String)>) -> Duration {
    let first = Arc::new(headers);
    let (base, _) = serve(Arc::new(move |n, _| {
        if n == 0 {
            (StatusCode::OK, (*first).clone())
        } else {
            (StatusCode::OK, vec![])
        }
    }))
    .await;
    let svc = RateLimitLayer::adaptive_only().layer(http());
    let url = format!("{base}/quota");
    assert_eq!(svc.clone().oneshot(get(&url)).await.unwrap().status(), 200);
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(10),
        "the call after a quota header",
        svc.clone().oneshot(get(&url)),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 200);
    start.elapsed()
}

/// `RateLimit` is a list field (draft-ietf-httpapi-ratelimit-headers: one item per policy), and
/// HTTP lets a list field be split over several field lines (RFC 9110 5.3). The docs read "a
/// `RateLimit` item with no quota left and a reset (the longest if several)": the exhausted
/// policy pauses the host whether it comes in the same line as another or in a line of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_items_in_one_line_or_several() {
    let one_line = wait_after(vec![h(
        "ratelimit",
        "\"minute\";r=50;t=30, \"second\";r=0;t=1",
    )])
    .await;
    eprintln!("one line: waited {one_line:?}");
    assert!(one_line >= Duration::from_millis(900), "{one_line:?}");
    let two_lines = wait_after(vec![
        h("ratelimit", "\"minute\";r=50;t=30"),
        h("ratelimit", "\"second\";r=0;t=1"),
    ])
    .await;
    eprintln!("two lines: waited {two_lines:?}");
    assert!(
        two_lines >= Duration::from_millis(900),
        "an exhausted policy on a second field line paused nobody: waited {two_lines:?}"
    );
}

/// `X-RateLimit-Reset` as a Unix time in the past (the server's clock runs behind ours): "A
/// reset in the past reads as zero", so no pause; as a Unix time in milliseconds 1.5 s ahead, a
/// pause of about 1.5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_ratelimit_reset_forms() {
    let past = wait_after(vec![
        h("x-ratelimit-remaining", "0"),
        h("x-ratelimit-reset", &(unix_now() - 100).to_string()),
    ])
    .await;
    assert!(past < Duration::from_millis(200), "past reset: {past:?}");
    let ms = (unix_now() * 1000 + 1500).to_string();
    let ahead = wait_after(vec![
        h("x-ratelimit-remaining", "0"),
        h("x-ratelimit-reset", &ms),
    ])
    .await;
    assert!(
        ahead >= Duration::from_millis(400) && ahead < Duration::from_millis(2600),
        "reset in ms: {ahead:?}"
    );
}

/// docs/guides/ratelimit.md: "A later, shorter reset never cuts a pause short." Two calls in
/// flight: the first is answered 429 `Retry-After: 2`, the second 100 ms later 429
/// `Retry-After: 1`; the next call waits for the longer pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_shorter_pause_does_not_cut_the_longer_one() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            match n {
                0 => (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "2")]).into_response(),
                1 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response()
                }
                _ => (StatusCode::OK, "ok").into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = format!("http://{addr}/longer");
    let svc = RateLimitLayer::adaptive_only().layer(http());
    let start = Instant::now();
    let (a, b) = tokio::join!(svc.clone().oneshot(get(&url)), async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        svc.clone().oneshot(get(&url)).await
    });
    assert_eq!(a.unwrap().status(), 429);
    assert_eq!(b.unwrap().status(), 429);
    let res = bounded(
        Duration::from_secs(5),
        "the call after two pauses",
        svc.clone().oneshot(get(&url)),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1900), "{took:?}");
}

/// docs/guides/reqwest.md: a body whose exact size is known and at most 1 MiB "is handed to
/// reqwest as bytes, so reqwest can send it again when it follows a 307 or 308 redirect; any
/// other body is streamed, and reqwest answers a 307 or 308 for it with the redirect response
/// itself".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_service_307_with_a_known_and_a_streamed_body() {
    let (base, _) = serve(Arc::new(|_, uri| {
        if uri.path() == "/from" {
            (StatusCode::TEMPORARY_REDIRECT, vec![h("location", "/to")])
        } else {
            (StatusCode::OK, vec![])
        }
    }))
    .await;
    let svc = ReqwestService::new(reqwest::Client::new());
    let req = http::Request::post(format!("{base}/from"))
        .body(Full::new(Bytes::from_static(b"0123456789")))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["uri"], "/to");
    assert_eq!(v["bytes"], 10, "the body sent again: {v}");

    let stream = http_body_util::StreamBody::new(futures_util::stream::iter(vec![Ok::<
        _,
        std::convert::Infallible,
    >(
        http_body::Frame::data(Bytes::from_static(b"0123456789")),
    )]));
    let req = http::Request::post(format!("{base}/from"))
        .body(stream)
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 307, "a streamed body is not sent again");
}

/// docs/guides/reqwest.md: "A streaming body ... is read into memory first, up to
/// `with_body_limit` [16 MiB]; a longer one fails the call with a `Body` error before anything
/// is sent." Through HAProxy to the origin: nothing arrives, and the error says it was not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_streamed_body_over_the_limit_is_not_sent() {
    let base = peer_or_skip!(NORMAL);
    let backend = peer_or_skip!(BACKEND);
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| ClientBuilder::new().build(next)).with_body_limit(1024))
        .build();
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = (0..4)
        .map(|_| Ok(http_body::Frame::data(Bytes::from(vec![b'x'; 512]))))
        .collect();
    let body = reqwest::Body::wrap(http_body_util::StreamBody::new(futures_util::stream::iter(
        chunks,
    )));
    let path = format!("/i24-stream-limit-{}", std::process::id());
    let err = bounded(
        Duration::from_secs(10),
        "a streamed body over the limit",
        client.post(format!("{base}{path}")).body(body).send(),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    eprintln!("streamed body over the limit: {text}");
    let seen = get_json(&format!("{backend}/count?path={path}")).await;
    assert_eq!(seen["hits"], 0, "{seen}");
    let e = sturdy_reqwest::find::<sturdy::core::Error>(&err).expect("a sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Body, "{text}");
    assert_eq!(sturdy_reqwest::delivery(&err), Delivery::NotSent, "{text}");
    assert!(!text.contains("may have been processed"), "{text}");
}

/// docs/guides/version.md: `VersionLayer::query(name, version)` pins the version ("both are
/// form-encoded") and "a version the caller set is kept".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_query_is_encoded_and_a_callers_own_is_kept() {
    let (base, _) = serve(Arc::new(|_, _| (StatusCode::OK, vec![]))).await;
    let client = ClientBuilder::new()
        .with_version(sturdy::version::VersionLayer::query(
            "api version",
            "2024-06&x=1",
        ))
        .build(http());
    let uri_of = |res: http::Response<hyper::body::Incoming>| async move {
        json(res).await["uri"].as_str().unwrap().to_string()
    };
    let res = client
        .clone()
        .oneshot(get(&format!("{base}/v?a=1")))
        .await
        .unwrap();
    let uri = uri_of(res).await;
    assert!(
        uri == "/v?a=1&api+version=2024-06%26x%3D1"
            || uri == "/v?a=1&api%20version=2024-06%26x%3D1",
        "{uri}"
    );
    let res = client
        .clone()
        .oneshot(get(&format!("{base}/v?api+version=mine")))
        .await
        .unwrap();
    let uri = uri_of(res).await;
    assert_eq!(
        uri, "/v?api+version=mine",
        "the caller's own version is kept"
    );
    // A deadline or another per-request setting does not change that.
    let mut req = get(&format!("{base}/v"));
    req.extensions_mut()
        .insert(sturdy::core::CallOptions::new().with_deadline(Duration::from_secs(5)));
    let res = client.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let uri = uri_of(res).await;
    assert!(uri.starts_with("/v?api"), "{uri}");
}

/// The other spellings the docs list ("`X-RateLimit-Remaining: 0` (or `X-Rate-Limit-*`,
/// `RateLimit-Remaining`) with a reset"), with a decimal reset ("a whole or decimal number of
/// seconds to wait"): each pauses the next call for about that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_quota_header_spellings_pause() {
    for (remaining, reset) in [
        ("ratelimit-remaining", "ratelimit-reset"),
        ("x-rate-limit-remaining", "x-rate-limit-reset"),
        ("X-RateLimit-Remaining", "X-RateLimit-Reset"),
    ] {
        let waited = wait_after(vec![h(remaining, "0"), h(reset, "0.8")]).await;
        eprintln!("{remaining}: waited {waited:?}");
        assert!(
            waited >= Duration::from_millis(700) && waited < Duration::from_millis(1500),
            "{remaining}: {waited:?}"
        );
    }
}
