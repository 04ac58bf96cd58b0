//! The README, read literally: the error words it promises (a reset connection given up on, a
//! POST that may have been processed, one that was never sent, a rate limit), the composed
//! client's defaults (idempotency keys on POST, a 30 s timeout per attempt), per-request
//! `CallOptions`, and the client as a `Clone + Send + Sync` service kept under `Buffer` and over
//! `ConcurrencyLimit(1)`. Wire tests on 127.0.0.1 in real time; timing on paused time.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use sturdy::core::{classify, find, BoxError, CallOptions, Delivery, ErrorKind, RateLimited};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tower::{service_fn, Service, ServiceExt};

fn quick_retry() -> RetryLayer {
    RetryLayer::new().with_seed(7).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(1), Duration::from_millis(5)).unwrap(),
    )
}

fn hyper_client() -> HyperClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    HyperClient::builder(TokioExecutor::new()).build_http()
}

/// A server that reads each request and then resets its connection (RST, no answer). Returns
/// its address and the raw requests it read.
async fn resetting_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = l.accept().await.unwrap();
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                loop {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                s.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&got).into_owned());
                let _ = sock.set_zero_linger();
                drop(sock);
            });
        }
    });
    (format!("http://{addr}"), seen)
}

/// A loopback port nobody listens on.
async fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// README.md:106: "Errors say what happened and what to do: ... `gave up after 4 attempts:
/// connection reset by peer`".
#[tokio::test]
async fn a_get_to_a_server_that_resets_gives_up_after_4_attempts_with_reset_by_peer() {
    let (base, seen) = resetting_server().await;
    let client = tower::Layer::layer(&quick_retry(), hyper_client());
    let req = Request::get(format!("{base}/orders"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let err = client.oneshot(req).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("gave up after 4 attempts: connection reset by peer"),
        "{msg}"
    );
    assert_eq!(seen.lock().unwrap().len(), 4);
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("one sturdy_core::Error");
    assert_eq!(e.report().unwrap().attempts(), 4);
    assert_eq!(classify::delivery(&*err), Delivery::MaybeProcessed);
    assert_eq!(*e.kind(), ErrorKind::Transport);
}

/// README.md:107: "or for a POST `...; it may have been processed: retry with the same
/// idempotency key 7f0c...`"; README.md:71: "One idempotency key for all attempts".
#[tokio::test]
async fn a_post_whose_connection_resets_names_its_key_and_may_have_been_processed() {
    let (base, seen) = resetting_server().await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(hyper_client());
    let req = Request::post(format!("{base}/orders"))
        .body(Full::from(r#"{"item":"book"}"#))
        .unwrap();
    let err = client.oneshot(req).await.unwrap_err();
    let msg = err.to_string();
    let e = find::<sturdy::core::Error>(&*err).expect("a sturdy error");
    let key = e
        .report()
        .and_then(|r| r.idempotency_key())
        .expect("the key in the report")
        .to_owned();
    assert!(
        msg.contains(&format!(
            "it may have been processed: retry with the same idempotency key {key}"
        )),
        "{msg}"
    );
    assert!(!msg.contains("not sent"), "{msg}");
    // Every attempt carried that same key.
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    for raw in seen.iter() {
        let lower = raw.to_ascii_lowercase();
        assert!(
            lower.contains(&format!("idempotency-key: {}", key.to_ascii_lowercase())),
            "{raw}"
        );
    }
}

/// README.md:106 and docs/guides/retry.md:141: for a POST "`...; the request was not sent, so it
/// is safe to send again` only when no attempt could have reached the server".
#[tokio::test]
async fn a_post_to_a_closed_port_says_it_was_not_sent() {
    let base = closed_port().await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(hyper_client());
    let req = Request::post(format!("{base}/orders"))
        .body(Full::from("x"))
        .unwrap();
    let err = client.oneshot(req).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("connection refused"), "{msg}");
    assert!(
        msg.contains("the request was not sent, so it is safe to send again"),
        "{msg}"
    );
    assert!(!msg.contains("may have been processed"), "{msg}");
    assert_eq!(classify::delivery(&*err), Delivery::NotSent);
    assert_eq!(classify::classify_error(&*err), ErrorKind::Connect);
}

fn api_429(
    retry_after: &'static str,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_req: Request<Full<Bytes>>| async move {
        Ok::<_, Infallible>(
            Response::builder()
                .status(StatusCode::TOO_MANY_REQUESTS)
                .header("retry-after", retry_after)
                .body(Full::default())
                .unwrap(),
        )
    })
}

/// README.md:106: "`rate limited by api.example.com; retry after 2m`", then: find a type with
/// `sturdy::core::find::<sturdy::core::RateLimited>(&*err)`, ask delivery with
/// `classify::delivery`, classify with `classify_error`. Through the composed client.
#[tokio::test(start_paused = true)]
async fn the_composed_client_says_rate_limited_by_the_host_retry_after_2m() {
    let client = ClientBuilder::new().build(api_429("120"));
    let req = Request::get("http://api.example.com/orders")
        .body(Full::default())
        .unwrap();
    let err = client.oneshot(req).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "rate limited by api.example.com; retry after 2m"
    );
    let rl = find::<RateLimited>(&*err).expect("RateLimited in the chain");
    assert_eq!(rl.retry_after(), Duration::from_secs(120));
    assert_eq!(classify::delivery(&*err), Delivery::MaybeProcessed);
    assert!(matches!(
        classify::classify_error(&*err),
        ErrorKind::RateLimited { .. }
    ));
}

/// README.md:112: "The client is `Clone + Send + Sync`".
#[test]
fn the_client_is_clone_send_sync_static() {
    fn assert_all<T: Clone + Send + Sync + 'static>(_: &T) {}
    let client = ClientBuilder::new().build(hyper_client());
    assert_all(&client);
    let _: sturdy::Client<hyper::body::Incoming> = client;
}

/// A scripted in-process API: the n-th call (from 0) answers `script(n)`; records the
/// idempotency key of each call.
#[derive(Clone)]
struct Api {
    calls: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<Option<String>>>>,
    script: Arc<dyn Fn(usize) -> Option<(u16, Option<&'static str>)> + Send + Sync>,
}

impl Api {
    fn new(
        script: impl Fn(usize) -> Option<(u16, Option<&'static str>)> + Send + Sync + 'static,
    ) -> Self {
        Self {
            calls: Arc::default(),
            keys: Arc::default(),
            script: Arc::new(script),
        }
    }
}

impl Service<Request<Full<Bytes>>> for Api {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>,
    >;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.keys.lock().unwrap().push(
            req.headers()
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_owned()),
        );
        let act = (self.script)(n);
        Box::pin(async move {
            match act {
                // None: never answers.
                None => std::future::pending().await,
                Some((status, ra)) => {
                    let mut b = Response::builder().status(status);
                    if let Some(ra) = ra {
                        b = b.header("retry-after", ra);
                    }
                    Ok(b.body(Full::default()).unwrap())
                }
            }
        })
    }
}

/// README.md:113: "Every layer keeps tower's readiness contract, so the client ... can sit under
/// a `Buffer` or over a `ConcurrencyLimit`, driven by ... a kept `ready().await?.call(req)`."
/// Retries (503s) and a server-asked pause (429 + Retry-After) on the way.
#[tokio::test(start_paused = true)]
async fn the_kept_client_under_buffer_over_concurrency_limit_one_does_not_deadlock() {
    let api = Api::new(|n| match n % 4 {
        0 => Some((503, None)),
        1 if n == 1 => Some((429, Some("1"))),
        _ => Some((200, None)),
    });
    let limited = tower::limit::ConcurrencyLimit::new(api.clone(), 1);
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(limited);
    let buffered = tower::buffer::Buffer::new(client, 1);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut svc = buffered.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                let req = Request::get(format!("http://api.example.com/o/{t}/{i}"))
                    .body(Full::default())
                    .unwrap();
                let res = svc.ready().await?.call(req).await?;
                assert_eq!(res.status(), StatusCode::OK);
            }
            Ok::<_, BoxError>(())
        }));
    }
    let all = async {
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(600), all)
        .await
        .expect("no deadlock");
    assert!(api.calls.load(Ordering::SeqCst) >= 20);
}

/// README.md:114: "Per-request settings (no retries, a deadline, an attempt timeout, an
/// idempotency key) go in the request's extensions as `sturdy::core::CallOptions`."
#[tokio::test(start_paused = true)]
async fn call_options_set_no_retries_a_key_and_an_attempt_timeout_per_request() {
    // No retries: a 503 comes back after one call.
    let api = Api::new(|_| Some((503, None)));
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(api.clone());
    let mut req = Request::get("http://api.example.com/a")
        .body(Full::default())
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let res = client.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.calls.load(Ordering::SeqCst), 1);

    // An idempotency key of the caller's, on every attempt.
    let api = Api::new(|n| Some(if n < 2 { (503, None) } else { (201, None) }));
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(api.clone());
    let mut req = Request::post("http://api.example.com/orders")
        .body(Full::from("x"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("order-42"));
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let keys = api.keys.lock().unwrap().clone();
    assert_eq!(keys, vec![Some("order-42".to_owned()); 3]);

    // An attempt timeout of the request's own.
    let api = Api::new(|_| None);
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(api.clone());
    let mut req = Request::get("http://api.example.com/slow")
        .body(Full::default())
        .unwrap();
    req.extensions_mut().insert(
        CallOptions::new()
            .with_attempt_timeout(Duration::from_millis(50))
            .without_retries(),
    );
    let start = tokio::time::Instant::now();
    let err = client.oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(50));
    assert_eq!(classify::classify_error(&*err), ErrorKind::Timeout);

    // A deadline over the whole call.
    let api = Api::new(|_| None);
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(api.clone());
    let mut req = Request::get("http://api.example.com/slow")
        .body(Full::default())
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(2)));
    let start = tokio::time::Instant::now();
    let err = client.oneshot(req).await.unwrap_err();
    assert!(
        start.elapsed() <= Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(classify::classify_error(&*err), ErrorKind::Timeout);
}

/// README.md:80 (the layer order: "AttemptTimeout -> per attempt") and the builder's documented
/// default "a 30 s timeout per attempt"; docs/guides/retry.md:137: "`the attempt timed out after
/// 30s`".
#[tokio::test(start_paused = true)]
async fn the_composed_client_cuts_each_attempt_at_30s() {
    let api = Api::new(|_| None);
    let client = ClientBuilder::new().build(api.clone());
    let mut req = Request::get("http://api.example.com/slow")
        .body(Full::default())
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let start = tokio::time::Instant::now();
    let err = client.oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert!(
        err.to_string().contains("the attempt timed out after 30s"),
        "{err}"
    );
    assert_eq!(classify::delivery(&*err), Delivery::MaybeProcessed);
}

/// README.md:69-71: "retried on 503, reset connections and 429 (within reason)" for a POST under
/// the composed client (the builder adds the idempotency key).
#[tokio::test(start_paused = true)]
async fn a_post_is_retried_on_503_and_on_a_short_429() {
    let api = Api::new(|n| {
        Some(match n {
            0 => (503, None),
            1 => (429, Some("1")),
            _ => (201, None),
        })
    });
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(api.clone());
    let req = Request::post("http://api.example.com/orders")
        .body(Full::from("x"))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let keys = api.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 3);
    assert!(keys[0].is_some());
    assert!(keys.iter().all(|k| k == &keys[0]));
}
