//! More of the recent claims from outside: refused tries in the composed client (attempt
//! timeouts, half-open probes, agents' summaries), messages for unsent POSTs, the body-limit
//! reading of `BodyError`, and an idempotent request whose body breaks off on the wire.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::routing::{post, post_service};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::body::buffer;
use sturdy::core::classify::delivery;
use sturdy::core::{
    find, BoxError, CallOptions, CircuitOpen, Delivery, Error, ErrorKind, ErrorSummary, OpenReason,
    RateLimited,
};
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::webhook::{sign_standard, MemoryQueue, StandardWebhooks, WebhookReceiver};
use sturdy::ClientBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_http::limit::RequestBodyLimitLayer;

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

fn counting_ok(
    calls: Arc<AtomicU32>,
) -> impl Service<Req, Response = Res, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_req: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(Response::new(Full::<Bytes>::default())) }
    })
}

fn with_opts(mut req: Req, opts: CallOptions) -> Req {
    req.extensions_mut().insert(opts);
    req
}

fn get() -> Req {
    Request::get("http://api.example.com/a")
        .body(Full::default())
        .unwrap()
}

/// Every try refused by the local rate limit (its wait past `max_retry_after`) on a POST
/// without a key: the retry guide says the message ends "the request was not sent, so it is
/// safe to send again".
#[tokio::test(start_paused = true)]
async fn words21_unkeyed_post_locally_refused_says_safe_to_send_again() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(3))
        .layer(
            RateLimitLayer::new(Quota::new(1, Duration::from_secs(120)).unwrap())
                .with_max_wait(Duration::ZERO),
        )
        .service(counting_ok(calls.clone()));
    svc.ready().await.unwrap().call(get()).await.unwrap();
    let post = Request::post("http://api.example.com/orders")
        .body(Full::from("{}"))
        .unwrap();
    let err = svc.ready().await.unwrap().call(post).await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{msg}");
    assert!(
        msg.contains("the request was not sent, so it is safe to send again"),
        "{msg}"
    );
}

/// The composed client's deadline refusal on a keyed POST: not sent, so the message does not
/// say it may have been processed, and the agent summary agrees.
#[tokio::test(start_paused = true)]
async fn words21_builder_deadline_refusal_on_post_summary_not_processed() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut client = ClientBuilder::new()
        .with_rate_limit(RateLimitLayer::new(
            Quota::new(1, Duration::from_secs(30)).unwrap(),
        ))
        .build(counting_ok(calls.clone()));
    client.ready().await.unwrap().call(get()).await.unwrap();
    let post = with_opts(
        Request::post("http://api.example.com/orders")
            .body(Full::from("{}"))
            .unwrap(),
        CallOptions::new()
            .with_deadline(Duration::from_secs(3))
            .with_idempotency_key("ord-77"),
    );
    let err = client.ready().await.unwrap().call(post).await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(!msg.contains("may have been processed"), "{msg}");
    let s = ErrorSummary::of(&*err);
    assert!(!s.may_have_been_processed, "{s:?}");
    assert_eq!(s.kind, "rate_limited", "{s:?}");
    assert!(s.retryable);
    let ms = s.retry_after_ms.expect("the wait");
    assert!((25_000..=30_000).contains(&ms), "{s:?}");
}

/// The agent summary of "a sent 503, then a refused try": the 503's kind and status, the call
/// may have been processed, one attempt, the key.
#[tokio::test(start_paused = true)]
async fn words21_summary_of_503_then_refusal_is_the_503s() {
    let api = service_fn(|_req: Req| async {
        Ok::<_, BoxError>(
            Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    });
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_max_attempts(2).with_seed(1))
        .layer(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .service(api);
    let req = Request::post("http://api.example.com/orders")
        .header("idempotency-key", "sum-1")
        .body(Full::from("{}"))
        .unwrap();
    let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
    let s = ErrorSummary::of(&*err);
    assert_eq!(s.kind, "server_error", "{s:?}");
    assert_eq!(s.status, Some(503), "{s:?}");
    assert!(s.may_have_been_processed, "{s:?}");
    assert_eq!(s.attempts, Some(1), "{s:?}");
    assert_eq!(s.idempotency_key.as_deref(), Some("sum-1"));
    assert!(s.retryable);
}

/// In the composed client, an attempt cut by its attempt timeout (counted by the breaker under
/// which `AttemptTimeoutLayer` sits) and a retry the opened breaker refuses: the kind is the
/// timeout's, one attempt, and the refusal is found.
#[tokio::test(start_paused = true)]
async fn words21_builder_attempt_timeout_then_open_breaker() {
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let api = service_fn(move |_req: Req| {
        c2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        }
    });
    let mut client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_max_attempts(2).with_seed(5))
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .with_attempt_timeout(Duration::from_secs(1))
        .build(api);
    let err = client.ready().await.unwrap().call(get()).await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{msg}");
    let e = find::<Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{msg}");
    assert_eq!(e.report().unwrap().attempts(), 1, "{msg}");
    assert!(
        msg.starts_with("gave up after 1 attempt and 1 refused try: "),
        "{msg}"
    );
    assert!(msg.contains("timed out"), "{msg}");
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err:?}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

/// A half-open breaker with its probe out and a call that asked for one attempt: the refusal
/// comes back at once, nothing was sent, and no wait is invented for it.
#[tokio::test(start_paused = true)]
async fn words21_probing_refusal_with_one_attempt_comes_back_at_once() {
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let api = service_fn(move |_req: Req| {
        let n = c2.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                return Ok::<_, BoxError>(
                    Response::builder()
                        .status(StatusCode::INTERNAL_SERVER_ERROR)
                        .body(Full::<Bytes>::default())
                        .unwrap(),
                );
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Response::new(Full::<Bytes>::default()))
        }
    });
    let client = ClientBuilder::new()
        .with_circuit_breaker(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_secs(1), Duration::from_secs(1)),
        )
        .without_attempt_timeout()
        .build(api);
    let mut c = client.clone();
    let _ = c
        .ready()
        .await
        .unwrap()
        .call(with_opts(get(), CallOptions::new().without_retries()))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut p = client.clone();
    let mut probe = Box::pin(
        p.ready()
            .await
            .unwrap()
            .call(with_opts(get(), CallOptions::new().without_retries())),
    );
    assert!(tokio::time::timeout(Duration::from_millis(10), &mut probe)
        .await
        .is_err());
    let start = Instant::now();
    let mut c = client.clone();
    let err = c
        .ready()
        .await
        .unwrap()
        .call(with_opts(
            get(),
            CallOptions::new()
                .without_retries()
                .with_deadline(Duration::from_secs(30)),
        ))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(50),
        "{:?}",
        start.elapsed()
    );
    let open = find::<CircuitOpen>(&*err).expect("the refusal");
    assert_eq!(open.reason(), OpenReason::Probing);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let s = ErrorSummary::of(&*err);
    assert_eq!(s.retry_after_ms, None, "{s:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    drop(probe);
}

/// Zero `max_wait` in the composed client with a deadline that fits the wait: the limiter
/// refuses, and the retry layer sleeps the wait the refusal carries, then sends.
#[tokio::test(start_paused = true)]
async fn words21_zero_max_wait_waits_in_retry_sleep_within_deadline() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut client = ClientBuilder::new()
        .with_rate_limit(
            RateLimitLayer::new(Quota::new(1, Duration::from_secs(2)).unwrap())
                .with_max_wait(Duration::ZERO),
        )
        .build(counting_ok(calls.clone()));
    client.ready().await.unwrap().call(get()).await.unwrap();
    let start = Instant::now();
    let res = client
        .ready()
        .await
        .unwrap()
        .call(with_opts(
            get(),
            CallOptions::new().with_deadline(Duration::from_secs(10)),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(1900));
    assert!(
        start.elapsed() <= Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A call waiting in the rate limit's line with a deadline, dropped mid-wait: the line is
/// empty again (`handle.waiting`), and nothing was sent for it.
#[tokio::test(start_paused = true)]
async fn words21_drop_while_waiting_turn_leaves_line_empty() {
    let calls = Arc::new(AtomicU32::new(0));
    let (limit, handle) =
        RateLimitLayer::new(Quota::new(1, Duration::from_secs(5)).unwrap()).pair();
    let mut client = ClientBuilder::new()
        .with_rate_limit(limit)
        .build(counting_ok(calls.clone()));
    client.ready().await.unwrap().call(get()).await.unwrap();
    let fut = client.ready().await.unwrap().call(with_opts(
        get(),
        CallOptions::new().with_deadline(Duration::from_secs(20)),
    ));
    let mut fut = Box::pin(fut);
    assert!(tokio::time::timeout(Duration::from_millis(500), &mut fut)
        .await
        .is_err());
    assert_eq!(handle.waiting("api.example.com"), 1);
    drop(fut);
    assert_eq!(handle.waiting("api.example.com"), 0);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A body with an error of its own, in a chain.
#[derive(Debug)]
struct Outer(Box<dyn std::error::Error + Send + Sync>);
impl std::fmt::Display for Outer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("outer body error")
    }
}
impl std::error::Error for Outer {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

struct Failing(Option<BoxError>);
impl Body for Failing {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.0.take() {
            Some(e) => Poll::Ready(Some(Err(e))),
            None => Poll::Ready(None),
        }
    }
}

/// `BodyError::is_too_large`: true past this read's limit and for a body cut by
/// `http_body_util::Limited` outside (also when that error sits deeper in a chain); false for
/// a body whose stream just fails.
#[tokio::test]
async fn words21_body_error_is_too_large_readings() {
    let own = buffer(Full::<Bytes>::from(vec![0u8; 100]), 10)
        .await
        .unwrap_err();
    assert!(own.is_too_large());
    let cut = buffer(Limited::new(Full::<Bytes>::from(vec![0u8; 100]), 10), 1000)
        .await
        .unwrap_err();
    assert!(cut.is_too_large(), "{cut:?}");
    // The cut error wrapped once more, as a framework's body error would.
    let inner = Limited::new(Full::<Bytes>::from(vec![0u8; 100]), 10)
        .collect()
        .await
        .unwrap_err();
    let deep = buffer(Failing(Some(Box::new(Outer(inner)))), 1000)
        .await
        .unwrap_err();
    assert!(deep.is_too_large(), "{deep:?}");
    let broken = buffer(
        Failing(Some(Box::new(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "incomplete",
        )))),
        1000,
    )
    .await
    .unwrap_err();
    assert!(!broken.is_too_large(), "{broken:?}");
    // Exactly at the limit is not too large.
    let exact = buffer(Limited::new(Full::<Bytes>::from(vec![0u8; 10]), 10), 10).await;
    assert_eq!(exact.unwrap().len(), 10);
}

async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

async fn raw_exchange(addr: std::net::SocketAddr, head: &str, body_part: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body_part).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A chunked idempotent request whose body breaks off (the client closes mid-body), under an
/// outer `RequestBodyLimitLayer` it does not reach: not a 413; the handler does not run, and
/// the key stays free for the whole request.
#[tokio::test]
async fn words21_broken_body_under_outer_limit_is_not_413() {
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move |_h: HeaderMap, body: Bytes| {
                let c = c2.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, body)
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ))
        .layer(RequestBodyLimitLayer::new(10_000));
    let addr = serve(app).await;
    let head = "POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: brk-1\r\ntransfer-encoding: chunked\r\n\r\n";
    let answer = raw_exchange(addr, head, b"5\r\nhello\r\n10\r\nabc").await;
    assert!(!answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let whole = raw_exchange(
        addr,
        "POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: brk-1\r\ncontent-length: 5\r\nconnection: close\r\n\r\n",
        b"hello",
    )
    .await;
    assert!(whole.starts_with("HTTP/1.1 201"), "{whole}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Two different `webhook-id` headers on one signed delivery: whatever is accepted is
/// deduplicated on the signed id, so a resend with only the signed id is a duplicate.
#[tokio::test]
async fn words21_two_webhook_id_headers_dedup_on_signed_id() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue);
    let addr = serve(Router::new().route("/wh", post_service(receiver))).await;
    let ts = sturdy::core::WallClock::now(&sturdy::core::SystemClock)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = b"{\"a\":1}";
    let sig = sign_standard(SECRET, "msg_a", ts, body).unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let send = |ids: Vec<&'static str>| {
        let mut req = Request::post(format!("http://{addr}/wh"));
        for id in ids {
            req = req.header("webhook-id", id);
        }
        let req = req
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig.clone())
            .body(Full::from(&body[..]))
            .unwrap();
        client.request(req)
    };
    let first = send(vec!["msg_a", "msg_b"]).await.unwrap().status();
    if first == StatusCode::OK {
        let ev = events.try_recv().expect("queued");
        assert_eq!(ev.id, "msg_a");
        let again = send(vec!["msg_a"]).await.unwrap().status();
        assert_eq!(again, StatusCode::OK);
        assert!(events.try_recv().is_none(), "queued twice");
    } else {
        assert!(first.is_client_error(), "{first}");
        assert!(events.try_recv().is_none());
    }
    // The reverse order must not verify under the other id.
    let swapped = send(vec!["msg_b", "msg_a"]).await.unwrap().status();
    if swapped == StatusCode::OK {
        if let Some(ev) = events.try_recv() {
            assert_eq!(
                ev.id, "msg_a",
                "an event under an id the signature does not cover"
            );
        }
    }
    let _: Option<Infallible> = None;
    let _ = RateLimited::new(Duration::ZERO);
}

/// A sent attempt answered 503, then a retry the auth layer could not send (its token expired
/// meanwhile and the token endpoint now fails): the refusal is a try, not an attempt; the kind
/// is the 503's.
#[tokio::test(start_paused = true)]
async fn words21_503_then_no_token_is_a_refused_try() {
    let token_calls = Arc::new(AtomicU32::new(0));
    let t2 = token_calls.clone();
    let token_client = service_fn(move |_req: Req| {
        let n = t2.fetch_add(1, Ordering::SeqCst);
        async move {
            let res: Res = if n == 0 {
                Response::new(Full::from(
                    r#"{"access_token":"t1","token_type":"Bearer","expires_in":1}"#,
                ))
            } else {
                Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .body(Full::from("down"))
                    .unwrap()
            };
            Ok::<_, BoxError>(res)
        }
    });
    let cc = sturdy::auth::ClientCredentials::new(
        token_client,
        "https://auth.example.com/token",
        "id",
        "secret-xyz",
    )
    .unwrap();
    let api_calls = Arc::new(AtomicU32::new(0));
    let a2 = api_calls.clone();
    let api = service_fn(move |_req: Req| {
        a2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<_, BoxError>(
                Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_max_attempts(2).with_seed(4))
        .layer(sturdy::auth::AuthLayer::oauth2(cc))
        .service(api);
    let req = Request::post("http://api.example.com/orders")
        .header("idempotency-key", "tok-k")
        .body(Full::from("{}"))
        .unwrap();
    let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(api_calls.load(Ordering::SeqCst), 1, "{msg}");
    let e = find::<Error>(&*err).unwrap();
    assert_eq!(e.report().unwrap().attempts(), 1, "{msg}");
    assert_eq!(
        e.kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{msg}"
    );
    assert!(
        msg.starts_with("gave up after 1 attempt and 1 refused try: 503 Service Unavailable; the try after it was refused before it was sent"),
        "{msg}"
    );
    assert!(msg.contains("token"), "{msg}");
    assert!(!msg.contains("secret-xyz"), "{msg}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

/// A `tracing` writer that keeps every line.
#[derive(Clone, Default)]
struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
impl io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// A `CallOptions` key without any control character (`clé-7`, non-ASCII) must not be logged
/// as holding control characters.
#[tokio::test(flavor = "current_thread")]
async fn words21_non_ascii_key_warning_does_not_claim_control_characters() {
    let lines = Lines::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(lines.clone())
        .with_ansi(false)
        .finish();
    let _guard = crate::logs13_common::set_default(subscriber);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let api = service_fn(move |req: Req| {
        s2.lock().unwrap().push(
            req.headers()
                .get("idempotency-key")
                .map(|v| v.as_bytes().to_vec()),
        );
        async move { Ok::<_, BoxError>(Response::new(Full::<Bytes>::default())) }
    });
    let mut client = ClientBuilder::new().build(api);
    let req = with_opts(
        Request::post("http://api.example.com/orders")
            .body(Full::from("{}"))
            .unwrap(),
        CallOptions::new().with_idempotency_key("clé-7"),
    );
    client.ready().await.unwrap().call(req).await.unwrap();
    let sent = seen.lock().unwrap()[0].clone().expect("a key");
    let logged = String::from_utf8_lossy(&lines.0.lock().unwrap()).into_owned();
    assert!(
        !logged.contains("control characters"),
        "key sent as {:?}; log: {logged}",
        String::from_utf8_lossy(&sent)
    );
}

/// What the retry layer's events say about a refused try: `RetryScheduled::attempt` counts tries
/// (a refused one too, as it counts against `max_attempts`) and `refused` marks the try that was
/// refused before it was sent, so no event passes a refusal off as a sent attempt.
#[tokio::test(start_paused = true)]
async fn words21_retry_events_number_only_sent_attempts() {
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let e2 = events.clone();
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let api = service_fn(move |_req: Req| {
        let n = c2.fetch_add(1, Ordering::SeqCst);
        async move {
            let status = if n == 0 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_seed(6)
                .with_max_attempts(4)
                .on_event(move |e| {
                    if let sturdy::core::events::Event::RetryScheduled {
                        attempt, refused, ..
                    } = e
                    {
                        e2.lock().unwrap().push((*attempt, *refused));
                    }
                }),
        )
        .layer(
            RateLimitLayer::new(Quota::new(1, Duration::from_secs(5)).unwrap())
                .with_max_wait(Duration::ZERO),
        )
        .service(api);
    let res = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let sent = calls.load(Ordering::SeqCst);
    assert_eq!(sent, 2);
    let events = events.lock().unwrap().clone();
    // The 503 (try 1, sent), then the try the limiter refused (try 2, not sent); try 3 is sent
    // and answered.
    assert_eq!(events, vec![(1, false), (2, true)]);
    let sent_events = events.iter().filter(|(_, refused)| !refused).count() as u32;
    assert!(sent_events < sent, "{events:?}");
}
