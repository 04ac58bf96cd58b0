//! More of what reqwest users and agent tools rely on: extensions across the middleware,
//! a request with its own timeout never shared by coalescing, streamed bodies that fail, and
//! tool results for values and errors a tool may hand over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::StreamBody;
use serde_json::Value;
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::summary::{tool_result, ErrorSummary};
use sturdy::core::{BoxError, CallOptions, Delivery};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use sturdy_reqwest::{delivery, SturdyMiddleware};

#[derive(Default)]
struct Seen {
    hits: AtomicUsize,
    fail_first: AtomicUsize,
}

async fn slow(State(s): State<Arc<Seen>>) -> impl IntoResponse {
    s.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    "slow"
}

async fn flaky(State(s): State<Arc<Seen>>) -> impl IntoResponse {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let left = s.fail_first.load(Ordering::SeqCst);
    if left > 0 {
        s.fail_first.store(left - 1, Ordering::SeqCst);
        return http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    "ok".into_response()
}

async fn server() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/slow", get(slow))
        .route("/flaky", get(flaky).post(flaky))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn quick() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10))
                .unwrap(),
        )
        .with_seed(5)
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("hung")
}

type Fut<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = reqwest_middleware::Result<reqwest::Response>> + Send + 'a,
    >,
>;

#[derive(Clone, Debug, PartialEq)]
struct Mark(usize);

/// After the sturdy middleware: marks each attempt's extensions with its number.
fn marker(
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
        let k = n.fetch_add(1, Ordering::SeqCst) + 1;
        ext.insert(Mark(k));
        Box::pin(next.run(req, ext))
    }
}

/// Before the sturdy middleware: records the mark the call's extensions hold at its end.
fn reader(
    out: Arc<Mutex<Option<Mark>>>,
) -> impl for<'a> Fn(
    reqwest::Request,
    &'a mut http::Extensions,
    reqwest_middleware::Next<'a>,
) -> Fut<'a>
       + Send
       + Sync
       + 'static {
    move |req, ext, next| {
        let out = out.clone();
        Box::pin(async move {
            let r = next.run(req, ext).await;
            *out.lock().unwrap() = ext.get::<Mark>().cloned();
            r
        })
    }
}

#[tokio::test]
async fn agents27_call_extensions_are_the_last_attempts() {
    let (base, seen) = server().await;
    seen.fail_first.store(2, Ordering::SeqCst);
    let attempts = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(Mutex::new(None));
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(reader(last.clone()))
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick()).build(next)
        }))
        .with(marker(attempts.clone()))
        .build();
    let res = within(client.get(format!("{base}/flaky")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(*last.lock().unwrap(), Some(Mark(3)));
}

#[tokio::test]
async fn agents27_call_options_reach_the_stack_through_with_extension() {
    let (base, seen) = server().await;
    seen.fail_first.store(5, Ordering::SeqCst);
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick()).build(next)
        }))
        .build();
    let res = within(
        client
            .get(format!("{base}/flaky"))
            .with_extension(CallOptions::new().without_retries())
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(seen.hits.load(Ordering::SeqCst), 1);
    // A deadline for the whole call.
    let t = tokio::time::Instant::now();
    let err = within(
        client
            .get(format!("{base}/slow"))
            .with_extension(CallOptions::new().with_deadline(Duration::from_millis(100)))
            .send(),
    )
    .await
    .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(280),
        "{:?}",
        t.elapsed()
    );
    let e = sturdy_reqwest::find::<sturdy::core::Error>(&err).expect("sturdy's error");
    assert_eq!(e.kind(), &sturdy::core::ErrorKind::Timeout, "{err}");
}

#[tokio::test]
async fn agents27_a_request_with_its_own_timeout_is_never_coalesced() {
    let (base, seen) = server().await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_retry(quick().with_max_attempts(1))
                .with_coalesce(CoalesceLayer::new())
                .build(next)
        }))
        .build();
    let patient = client.get(format!("{base}/slow")).send();
    let hasty = client
        .get(format!("{base}/slow"))
        .timeout(Duration::from_millis(50))
        .send();
    let (patient, hasty) = within(async { tokio::join!(patient, hasty) }).await;
    assert_eq!(patient.unwrap().text().await.unwrap(), "slow");
    let err = hasty.unwrap_err();
    assert_eq!(ErrorSummary::of(&err).kind, "timeout", "{err}");
    assert_eq!(seen.hits.load(Ordering::SeqCst), 2);
    // Two patient callers share one call.
    let a = client.get(format!("{base}/slow")).send();
    let b = client.get(format!("{base}/slow")).send();
    let (a, b) = within(async { tokio::join!(a, b) }).await;
    assert_eq!(within(a.unwrap().text()).await.unwrap(), "slow");
    assert_eq!(within(b.unwrap().text()).await.unwrap(), "slow");
    assert_eq!(seen.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn agents27_a_streamed_body_that_fails_is_not_sent() {
    let (base, seen) = server().await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick()).build(next)
        }))
        .build();
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = vec![
        Ok(http_body::Frame::data(Bytes::from_static(b"part"))),
        Err(std::io::Error::other("disk gone")),
    ];
    let body = reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(chunks)));
    let err = within(client.post(format!("{base}/flaky")).body(body).send())
        .await
        .unwrap_err();
    assert_eq!(seen.hits.load(Ordering::SeqCst), 0, "{err}");
    assert_eq!(delivery(&err), Delivery::NotSent, "{err}");
    // A body that never ends: the call can be dropped, nothing is sent.
    let body = reqwest::Body::wrap(StreamBody::new(futures_util::stream::pending::<
        Result<http_body::Frame<Bytes>, std::io::Error>,
    >()));
    let r = tokio::time::timeout(
        Duration::from_millis(100),
        client.post(format!("{base}/flaky")).body(body).send(),
    )
    .await;
    assert!(r.is_err());
    assert_eq!(seen.hits.load(Ordering::SeqCst), 0);
    // The client still works.
    let res = within(client.get(format!("{base}/flaky")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[test]
fn agents27_tool_result_of_values_json_cannot_hold_never_panics() {
    let mut bad: HashMap<(u8, u8), u8> = HashMap::new();
    bad.insert((1, 2), 3);
    let out = std::panic::catch_unwind(|| tool_result(Ok::<_, BoxError>(bad)));
    let out = out.expect("tool_result panicked on a map with non-string keys");
    assert!(out["content"][0]["text"].is_string(), "{out}");
    let out = tool_result(Ok::<_, BoxError>(f64::NAN));
    assert!(out["content"][0]["text"].is_string(), "{out}");
    assert_eq!(out["isError"], false);
}

#[derive(Debug)]
struct Deep(Option<Box<Self>>, usize);

impl std::fmt::Display for Deep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "level {}", self.1)
    }
}

impl std::error::Error for Deep {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.as_deref().map(|d| d as _)
    }
}

#[test]
fn agents27_summary_of_odd_errors() {
    // A long chain.
    let mut e = Deep(None, 0);
    for i in 1..2_000 {
        e = Deep(Some(Box::new(e)), i);
    }
    let s = ErrorSummary::of(&e);
    assert_eq!(s.kind, "other");
    assert!(s.message.len() < 100_000, "{} bytes", s.message.len());
    // A message with newlines: the tool text still ends with one advice line.
    let boxed: BoxError = "first line\nsecond line".into();
    let out = tool_result::<Value>(Err(boxed));
    let text = out["content"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("first line"), "{text}");
    // An empty message still tells the model what to do.
    let boxed: BoxError = "".into();
    let out = tool_result::<Value>(Err(boxed));
    let text = out["content"][0]["text"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "{out}");
    let mut dropped = Some(e);
    // Dropping a deep chain must not overflow the stack either (the test's own value).
    let t = std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(move || drop(dropped.take()))
        .unwrap();
    t.join().unwrap();
}

/// Reads each request head and closes without answering.
async fn closing_server() -> String {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
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
                drop(tcp);
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn agents27_summary_of_a_middleware_error_has_sturdys_facts() {
    let base = closing_server().await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick()).build(next)
        }))
        .build();
    // A POST whose connection closes: the message names the key; the summary must carry it.
    let err = within(client.post(format!("{base}/orders")).body("{}").send())
        .await
        .unwrap_err();
    let e = sturdy_reqwest::find::<sturdy::core::Error>(&err).expect("sturdy's error");
    let key = e.report().unwrap().idempotency_key().unwrap().to_owned();
    assert!(err.to_string().contains(&key), "{err}");
    let out = tool_result::<Value>(Err(BoxError::from(err)));
    let summary = &out["structuredContent"]["error"];
    assert_eq!(summary["idempotency_key"], key.as_str(), "{out}");
    assert_eq!(summary["attempts"], 4, "{out}");
    // A call that ran out of its deadline is a timeout.
    let (slow_base, _seen) = server().await;
    let err = within(
        client
            .get(format!("{slow_base}/slow"))
            .with_extension(CallOptions::new().with_deadline(Duration::from_millis(100)))
            .send(),
    )
    .await
    .unwrap_err();
    let s = ErrorSummary::of(&err);
    assert_eq!(s.kind, "timeout", "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn agents27_timeouts_the_guide_recommends_read_as_timeouts() {
    // agents.md: bound the read of the body "with tokio::time::timeout around it".
    let elapsed = tokio::time::timeout(Duration::from_millis(1), std::future::pending::<()>())
        .await
        .unwrap_err();
    let s = ErrorSummary::of(&elapsed);
    assert_eq!(s.kind, "timeout", "tokio's Elapsed: {s:?}");
    assert!(s.retryable, "{s:?}");
    assert!(s.may_have_been_processed, "{s:?}");
    // tower's Timeout layer around the client.
    let svc = tower::ServiceBuilder::new()
        .timeout(Duration::from_millis(1))
        .service(tower::service_fn(|_: ()| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, BoxError>(())
        }));
    let err = tower::ServiceExt::oneshot(svc, ()).await.unwrap_err();
    let s = ErrorSummary::of(&*err);
    assert_eq!(s.kind, "timeout", "tower's Elapsed: {s:?}");
    assert!(s.retryable, "{s:?}");
}

#[tokio::test]
async fn agents27_buffer_keeps_the_retry_report() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = ClientBuilder::new()
        .with_retry(quick())
        .build(sturdy_chaos::http_client());
    let buffered = tower::ServiceBuilder::new().buffer(2).service(client);
    let req = http::Request::post(format!("http://127.0.0.1:{port}/orders"))
        .body(http_body_util::Full::<Bytes>::from("{}"))
        .unwrap();
    let err = within(tower::ServiceExt::oneshot(buffered, req))
        .await
        .unwrap_err();
    let s = ErrorSummary::of(&*err);
    assert_eq!(s.kind, "connect", "{s:?}");
    assert!(!s.may_have_been_processed, "{s:?}");
    assert_eq!(s.attempts, Some(4), "{s:?}");
    assert!(s.idempotency_key.is_some(), "{s:?}");
}
