//! Outside tests of sturdy-reqwest against docs/guides/reqwest.md, on loopback sockets in real
//! time with millisecond settings.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::Full;
use sturdy::core::{CallOptions, Delivery, ErrorKind};
use sturdy::reqwest::{delivery, find, ReqwestService, SturdyMiddleware};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

async fn serve(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new().with_seed(1).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(5), Duration::from_millis(20)).unwrap(),
    )
}

/// A server that reads the request head and closes the connection without answering.
async fn closer() -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            n2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), n)
}

fn middleware_client(retry: RetryLayer) -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new().with_retry(retry).build(next)
        }))
        .build()
}

#[tokio::test]
async fn connection_closed_after_the_request_is_maybe_processed_and_retried_with_one_key() {
    let (base, n) = closer().await;
    let client = middleware_client(quick_retry());
    let err = client
        .post(format!("{base}/orders"))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    assert_eq!(n.load(Ordering::SeqCst), 4, "{err}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    let e = find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Transport, "{err}");
    let msg = err.to_string();
    eprintln!("closed: {msg}");
    assert!(msg.contains("retry with the same idempotency key"), "{msg}");
}

#[tokio::test]
async fn secrets_in_the_url_are_not_in_errors() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = middleware_client(quick_retry());
    let err = client
        .get(format!(
            "http://user:hunter2@127.0.0.1:{port}/x?api_key=TOPSECRET#frag"
        ))
        .send()
        .await
        .unwrap_err();
    let all = format!("{err} {err:?}");
    assert!(
        !all.contains("TOPSECRET") && !all.contains("hunter2"),
        "{all}"
    );
    // reqwest follows redirects out of sturdy's sight, so a connect error may be on a redirect's
    // target after the server got the request (reqwest.md): may have been processed.
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection refused"
    );
    let (base, _) = closer().await;
    let err = client
        .get(format!("{base}/x?api_key=TOPSECRET"))
        .send()
        .await
        .unwrap_err();
    let all = format!("{err} {err:?}");
    assert!(!all.contains("TOPSECRET"), "{all}");
}

#[tokio::test]
async fn reqwest_timeout_bounds_each_attempt() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let base = serve(Router::new().route(
        "/slow",
        get(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                "late"
            }
        }),
    ))
    .await;
    let client = middleware_client(quick_retry());
    let start = tokio::time::Instant::now();
    let err = client
        .get(format!("{base}/slow"))
        .timeout(Duration::from_millis(50))
        .send()
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(hits.load(Ordering::SeqCst), 4, "{err}");
    // Four attempts of 300 ms each would take 1.2 s: each was cut at 50 ms.
    assert!(took < Duration::from_millis(1_000), "{took:?}");
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: timed out (reqwest's timeout)"
    );
    assert_eq!(
        find::<sturdy::core::Error>(&err).unwrap().kind(),
        &ErrorKind::Timeout
    );
}

#[tokio::test]
async fn call_options_reach_the_stack() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let base = serve(Router::new().route(
        "/flaky",
        get(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                (http::StatusCode::SERVICE_UNAVAILABLE, "down")
            }
        }),
    ))
    .await;
    let client = middleware_client(quick_retry());
    let res = client
        .get(format!("{base}/flaky"))
        .with_extension(CallOptions::new().without_retries())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let res = client.get(format!("{base}/flaky")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(hits.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn response_url_and_remote_addr() {
    let base = serve(Router::new().route("/ok", get(|| async { "ok" }))).await;
    let client = middleware_client(quick_retry());
    let res = client.get(format!("{base}/ok?x=1")).send().await.unwrap();
    assert_eq!(res.url().as_str(), format!("{base}/ok?x=1"));
    assert!(res.remote_addr().is_some(), "remote_addr() is None");
    assert_eq!(res.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn a_streaming_body_over_the_limit_fails_before_sending() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let base = serve(Router::new().route(
        "/up",
        post(move |b: Bytes| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                b.len().to_string()
            }
        }),
    ))
    .await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| ClientBuilder::new().build(next)).with_body_limit(1024))
        .build();
    let stream_body = reqwest::Body::wrap(http_body_util::StreamBody::new(
        futures_util::stream::iter((0..8).map(|_| {
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(vec![b'a'; 512])))
        })),
    ));
    let err = client
        .post(format!("{base}/up"))
        .body(stream_body)
        .send()
        .await
        .unwrap_err();
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_eq!(
        find::<sturdy::core::Error>(&err).unwrap().kind(),
        &ErrorKind::Body,
        "{err}"
    );
    assert_eq!(delivery(&err), Delivery::NotSent, "{err}");
    eprintln!("too long: {err}");
    // Under the limit: sent, as bytes.
    let stream_body = reqwest::Body::wrap(http_body_util::StreamBody::new(
        futures_util::stream::iter((0..2).map(|_| {
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(vec![b'a'; 512])))
        })),
    ));
    let res = client
        .post(format!("{base}/up"))
        .body(stream_body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "1024");
}

#[tokio::test]
async fn reqwest_service_is_shareable_and_follows_a_307_with_the_body() {
    fn shareable<T: Clone + Send + Sync + 'static>(_: &T) {}
    let base = serve(
        Router::new()
            .route(
                "/old",
                post(|| async { (http::StatusCode::TEMPORARY_REDIRECT, [("location", "/new")]) }),
            )
            .route(
                "/new",
                post(|b: Bytes| async move { format!("got {}", b.len()) }),
            ),
    )
    .await;
    let svc = ReqwestService::new(reqwest::Client::new());
    shareable(&svc);
    let client = ClientBuilder::new().build(svc);
    let res = client
        .oneshot(
            http::Request::post(format!("{base}/old"))
                .body(Full::from("12345"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.extensions().get::<reqwest::Url>().unwrap().path(),
        "/new"
    );
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"got 5");
}

#[tokio::test]
async fn a_body_read_error_after_headers_is_a_body_error() {
    // The server announces 1000 bytes and closes after 10.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    let client = middleware_client(quick_retry());
    let res = client.get(format!("http://{addr}/x")).send().await.unwrap();
    let err = res.bytes().await.unwrap_err();
    eprintln!("body error: {err}");
    // Through ReqwestService: the body error is a sturdy Error.
    let client = ClientBuilder::new().build(ReqwestService::new(reqwest::Client::new()));
    let res = client
        .oneshot(
            http::Request::get(format!("http://{addr}/x"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let err = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap_err();
    let e: sturdy::core::Error = err;
    eprintln!("service body error: {e} ({:?})", e.kind());
    assert_eq!(e.kind(), &ErrorKind::Body);
}
