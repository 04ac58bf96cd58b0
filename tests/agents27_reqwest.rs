//! reqwest users: `SturdyMiddleware` and `ReqwestService` against a real axum server on
//! loopback: bodies, timeouts, cancellation, retries and keys as the server saw them, error
//! texts and delivery on resets and refused connections, and no API key in any error.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use http_body_util::{BodyExt, Full, StreamBody};
use sturdy::core::{Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use sturdy_reqwest::{delivery, find, ReqwestService, SturdyMiddleware};
use tokio::io::AsyncReadExt;
use tower::ServiceExt;

#[derive(Default)]
struct Seen {
    /// (path, idempotency key, body length, first body byte)
    calls: Mutex<Vec<(String, Option<String>, usize)>>,
    fail_first: AtomicUsize,
    slow_first: AtomicUsize,
    started: AtomicUsize,
}

async fn orders(State(s): State<Arc<Seen>>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_owned());
    s.calls
        .lock()
        .unwrap()
        .push(("/orders".into(), key, body.len()));
    let left = s.fail_first.load(Ordering::SeqCst);
    if left > 0 {
        s.fail_first.store(left - 1, Ordering::SeqCst);
        return (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
    }
    (StatusCode::CREATED, format!("{}", body.len())).into_response()
}

async fn slow(State(s): State<Arc<Seen>>) -> impl IntoResponse {
    s.calls.lock().unwrap().push(("/slow".into(), None, 0));
    let left = s.slow_first.load(Ordering::SeqCst);
    if left > 0 {
        s.slow_first.store(left - 1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    "ok"
}

async fn hold(State(s): State<Arc<Seen>>) -> impl IntoResponse {
    s.started.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30)).await;
    "late"
}

async fn redirect() -> impl IntoResponse {
    (StatusCode::TEMPORARY_REDIRECT, [("location", "/orders")])
}

async fn server() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/orders", post(orders))
        .route("/slow", get(slow))
        .route("/hold", get(hold))
        .route("/redirect", post(redirect))
        .with_state(seen.clone())
        .layer(axum::extract::DefaultBodyLimit::disable());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10))
                .unwrap(),
        )
        .with_seed(27)
}

fn mw_client(body_limit: Option<usize>) -> reqwest_middleware::ClientWithMiddleware {
    let mut mw =
        SturdyMiddleware::new(|next| ClientBuilder::new().with_retry(quick_retry()).build(next));
    if let Some(n) = body_limit {
        mw = mw.with_body_limit(n);
    }
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(mw)
        .build()
}

fn stream_body(total: usize) -> reqwest::Body {
    let chunks: Vec<Result<http_body::Frame<Bytes>, Infallible>> = (0..total.div_ceil(1000))
        .map(|i| {
            let n = 1000.min(total - i * 1000);
            Ok(http_body::Frame::data(Bytes::from(vec![b'x'; n])))
        })
        .collect();
    reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(chunks)))
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("hung")
}

#[tokio::test]
async fn agents27_streamed_body_over_the_limit_fails_before_anything_is_sent() {
    let (base, seen) = server().await;
    let client = mw_client(Some(5_000));
    let err = within(
        client
            .post(format!("{base}/orders"))
            .body(stream_body(5_001))
            .send(),
    )
    .await
    .unwrap_err();
    let e = find::<sturdy::core::Error>(&err).expect("a sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Body, "{err}");
    assert!(seen.calls.lock().unwrap().is_empty());
    // At the limit exactly, it is sent.
    let res = within(
        client
            .post(format!("{base}/orders"))
            .body(stream_body(5_000))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.text().await.unwrap(), "5000");
}

#[tokio::test]
async fn agents27_body_refused_before_sending_is_not_sent() {
    let (base, _seen) = server().await;
    let client = mw_client(Some(10));
    let err = within(
        client
            .post(format!("{base}/orders"))
            .body(stream_body(11))
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        delivery(&err),
        Delivery::NotSent,
        "nothing was sent, yet the agent is told it may have been processed: {err}"
    );
}

#[tokio::test]
async fn agents27_streamed_body_is_replayed_whole_with_one_key() {
    let (base, seen) = server().await;
    seen.fail_first.store(2, Ordering::SeqCst);
    let client = mw_client(None);
    let res = within(
        client
            .post(format!("{base}/orders"))
            .body(stream_body(70_000))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    let calls = seen.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
    let key = calls[0].1.clone().expect("an idempotency key");
    for c in &calls {
        assert_eq!(c.1.as_deref(), Some(key.as_str()));
        assert_eq!(c.2, 70_000);
    }
}

#[tokio::test]
async fn agents27_replay_limit_boundary_is_one_mebibyte() {
    for (len, expected_calls) in [(1_048_576usize, 3usize), (1_048_577, 1)] {
        let (base, seen) = server().await;
        seen.fail_first.store(2, Ordering::SeqCst);
        let client = mw_client(None);
        let r = within(
            client
                .post(format!("{base}/orders"))
                .body(vec![b'y'; len])
                .send(),
        )
        .await;
        let calls = seen.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), expected_calls, "body of {len} bytes: {r:?}");
        assert!(calls.iter().all(|c| c.2 == len));
        if expected_calls == 3 {
            assert_eq!(r.unwrap().status(), 201);
        }
    }
}

#[tokio::test]
async fn agents27_reqwest_timeout_bounds_each_attempt_and_retries() {
    let (base, seen) = server().await;
    seen.slow_first.store(2, Ordering::SeqCst);
    let client = mw_client(None);
    let res = within(
        client
            .get(format!("{base}/slow"))
            .timeout(Duration::from_millis(100))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.calls.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn agents27_dropped_call_sends_no_more_attempts_and_the_client_goes_on() {
    let (base, seen) = server().await;
    let client = mw_client(None);
    // Dropped while the server holds the first attempt.
    let r = tokio::time::timeout(
        Duration::from_millis(150),
        client.get(format!("{base}/hold")).send(),
    )
    .await;
    assert!(r.is_err());
    assert_eq!(seen.started.load(Ordering::SeqCst), 1);
    // Dropped during the backoff after a 503 (a long backoff).
    let slow_retry = RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(300), Duration::from_millis(300))
                .unwrap(),
        )
        .with_seed(1);
    let client2 = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(slow_retry).build(next)
        }))
        .build();
    seen.fail_first.store(1, Ordering::SeqCst);
    let r = tokio::time::timeout(
        Duration::from_millis(100),
        client2.post(format!("{base}/orders")).body("x").send(),
    )
    .await;
    assert!(r.is_err());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        seen.calls.lock().unwrap().len(),
        1,
        "an attempt after the drop"
    );
    // Both clients still work.
    let res = within(client.post(format!("{base}/orders")).body("a").send())
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let res = within(client2.post(format!("{base}/orders")).body("b").send())
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(seen.started.load(Ordering::SeqCst), 1);
}

type Fut<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = reqwest_middleware::Result<reqwest::Response>> + Send + 'a,
    >,
>;

/// A middleware that counts the requests it sees.
fn count(
    n: Arc<AtomicUsize>,
) -> impl for<'a> Fn(
    reqwest::Request,
    &'a mut http::Extensions,
    reqwest_middleware::Next<'a>,
) -> Fut<'a>
       + Send
       + Sync
       + 'static {
    move |req, ext, next| {
        n.fetch_add(1, Ordering::SeqCst);
        Box::pin(next.run(req, ext))
    }
}

#[tokio::test]
async fn agents27_middlewares_before_see_calls_after_see_attempts() {
    let (base, seen) = server().await;
    seen.fail_first.store(2, Ordering::SeqCst);
    let before = Arc::new(AtomicUsize::new(0));
    let after = Arc::new(AtomicUsize::new(0));
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(count(before.clone()))
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .with(count(after.clone()))
        .build();
    let res = within(client.post(format!("{base}/orders")).body("z").send())
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(before.load(Ordering::SeqCst), 1);
    assert_eq!(after.load(Ordering::SeqCst), 3);
    assert!(res.remote_addr().is_some());
    assert_eq!(res.url().path(), "/orders");
}

fn assert_no_secret(err: &reqwest_middleware::Error) {
    let shown = format!("{err} | {err:?}");
    assert!(!shown.contains("SECRET"), "{shown}");
    let s = sturdy::core::summary::ErrorSummary::of(err);
    assert!(!s.message.contains("SECRET"), "{}", s.message);
    if let Some(e) = find::<sturdy::core::Error>(err) {
        let shown = format!("{e} | {e:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        let s = sturdy::core::summary::ErrorSummary::of(e);
        let j = serde_json::to_string(&s).unwrap();
        assert!(!j.contains("SECRET"), "{j}");
    }
    if let Some(e) = find::<reqwest::Error>(err) {
        let shown = format!("{e} | {e:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
    }
}

#[tokio::test]
async fn agents27_refused_connection_text_delivery_and_no_api_key() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = mw_client(None);
    let err = within(
        client
            .post(format!("http://127.0.0.1:{port}/orders?api_key=SECRET"))
            .body("x")
            .send(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("gave up after 4 attempts: connection refused"),
        "{err}"
    );
    // reqwest follows redirects out of sturdy's sight, so a connect error may be on a redirect's
    // target after the server got the request (reqwest.md): may have been processed.
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert_no_secret(&err);
    let err = within(
        client
            .get(format!("http://127.0.0.1:{port}/orders?api_key=SECRET"))
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection refused"
    );
    assert_no_secret(&err);
}

#[tokio::test]
async fn agents27_timeout_error_has_no_api_key() {
    let (base, _seen) = server().await;
    let client = mw_client(None);
    let err = within(
        client
            .get(format!("{base}/hold?api_key=SECRET"))
            .timeout(Duration::from_millis(30))
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: timed out (reqwest's timeout)"
    );
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert_no_secret(&err);
}

/// Accepts, reads the request head, and closes without answering.
async fn closing_server() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(k) = tcp.read(&mut buf).await else {
                        return;
                    };
                    if k == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..k]);
                }
                count.fetch_add(1, Ordering::SeqCst);
                drop(tcp);
            });
        }
    });
    (format!("http://{addr}"), n)
}

#[tokio::test]
async fn agents27_early_close_is_transport_maybe_processed_and_retried_with_a_key() {
    let (base, n) = closing_server().await;
    let client = mw_client(None);
    let err = within(
        client
            .post(format!("{base}/orders?api_key=SECRET"))
            .body("x")
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(n.load(Ordering::SeqCst), 4, "{err}");
    let e = find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Transport, "{err}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert!(
        err.to_string().starts_with(
            "gave up after 4 attempts: the connection closed before the response was complete"
        ),
        "{err}"
    );
    assert!(err.to_string().contains("idempotency key"), "{err}");
    assert_no_secret(&err);
}

#[tokio::test]
async fn agents27_reqwest_service_follows_307_with_a_sized_body_only() {
    let (base, seen) = server().await;
    let http = ReqwestService::new(reqwest::Client::new());
    let req = http::Request::post(format!("{base}/redirect"))
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let res = within(http.clone().oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(
        res.extensions().get::<reqwest::Url>().unwrap().path(),
        "/orders"
    );
    assert_eq!(seen.calls.lock().unwrap()[0].2, 5);
    // A streamed body: the redirect response itself.
    let chunks: Vec<Result<http_body::Frame<Bytes>, Infallible>> =
        vec![Ok(http_body::Frame::data(Bytes::from_static(b"hello")))];
    let req = http::Request::post(format!("{base}/redirect"))
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let res = within(http.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 307);
    assert_eq!(seen.calls.lock().unwrap().len(), 1);
}

/// Answers with a Content-Length of 100 and 10 bytes, then closes.
async fn short_body_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut buf = vec![0u8; 8192];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await;
                let _ = tcp.flush().await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn agents27_response_body_read_errors_are_sturdy_errors_without_api_key() {
    let base = short_body_server().await;
    let http = ReqwestService::new(reqwest::Client::new());
    let req = http::Request::get(format!("{base}/x?api_key=SECRET"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let res = within(http.oneshot(req)).await.unwrap();
    let err = within(res.into_body().collect()).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Body, "{err}");
    let shown = format!("{err} | {err:?}");
    assert!(!shown.contains("SECRET"), "{shown}");
    // Through the middleware: the body error reqwest reports is reqwest's own.
    let client = mw_client(None);
    let res = within(client.get(format!("{base}/x?api_key=SECRET")).send())
        .await
        .unwrap();
    let err = within(res.bytes()).await.unwrap_err();
    let e = sturdy_reqwest::from_reqwest_error(err);
    assert_eq!(e.kind(), &ErrorKind::Body);
    let shown = format!("{e} | {e:?}");
    assert!(!shown.contains("SECRET"), "{shown}");
}
