//! Outside tests: errors never lie about delivery (docs/guides/retry.md "What the caller gets",
//! docs/guides/hedge.md, docs/guides/auth.md "Errors", `sturdy_core::classify::delivery`).
#![cfg(feature = "full")]

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, Token, TokenSource};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::classify::{concerns_destination, delivery};
use sturdy::core::{BoxError, Delivery, Error as SturdyError, ErrorKind, RateLimited};
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::{OnStoreError, Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

type Body = Full<Bytes>;

fn get() -> Request<Body> {
    Request::get("http://api.test/x")
        .body(Body::default())
        .unwrap()
}

fn io_err(kind: io::ErrorKind) -> BoxError {
    Box::new(io::Error::new(kind, format!("{kind:?}")))
}

fn sturdy_err(e: &BoxError) -> &SturdyError {
    e.downcast_ref::<SturdyError>()
        .unwrap_or_else(|| panic!("not a sturdy_core::Error: {e}"))
}

// ---------------------------------------------------------------- hedging

/// An API whose first 150 calls answer in 10 ms; then call 150 (the first copy) and call 151 (the
/// hedge) fail as given, after the given delays.
fn hedged_api(
    first: (Duration, io::ErrorKind),
    second: (Duration, io::ErrorKind),
) -> impl Service<
    Request<Body>,
    Response = Response<Body>,
    Error = BoxError,
    Future = impl Future<Output = Result<Response<Body>, BoxError>> + Send,
> + Clone
       + Send {
    let n = Arc::new(AtomicUsize::new(0));
    tower::service_fn(move |_req: Request<Body>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            let (d, fail) = match i {
                0..150 => (Duration::from_millis(10), None),
                150 => (first.0, Some(first.1)),
                151 => (second.0, Some(second.1)),
                _ => (Duration::from_millis(10), None),
            };
            tokio::time::sleep(d).await;
            match fail {
                Some(k) => Err(io_err(k)),
                None => Ok(Response::new(Body::default())),
            }
        }
    })
}

async fn hedged_failure(
    first: (Duration, io::ErrorKind),
    second: (Duration, io::ErrorKind),
) -> (BoxError, u64) {
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(hedged_api(first, second));
    for _ in 0..150 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    let err = svc.clone().oneshot(get()).await.unwrap_err();
    let hedges = handle.stats("api.test").map(|s| s.hedges()).unwrap_or(0);
    (err, hedges)
}

/// hedge crate docs: "When both fail, the call fails with the later error, unless that one says
/// the request was never sent (a refused connection) while the earlier one may have been
/// processed (a reset after the request was written): then with the earlier one, so
/// `classify::delivery` never claims "not sent" for a call one of whose copies may have reached
/// the server."
#[tokio::test(start_paused = true)]
async fn hedge_reset_then_refused_is_never_not_sent() {
    // The first copy is reset at 50 ms; the hedge (sent at about 10 ms) is refused at 80 ms.
    let (err, hedges) = hedged_failure(
        (Duration::from_millis(50), io::ErrorKind::ConnectionReset),
        (Duration::from_millis(70), io::ErrorKind::ConnectionRefused),
    )
    .await;
    assert_eq!(hedges, 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
}

#[tokio::test(start_paused = true)]
async fn hedge_refused_then_reset_is_never_not_sent() {
    // The hedge is reset at about 20 ms; the first copy is refused at 50 ms (the later error).
    let (err, hedges) = hedged_failure(
        (Duration::from_millis(50), io::ErrorKind::ConnectionRefused),
        (Duration::from_millis(5), io::ErrorKind::ConnectionReset),
    )
    .await;
    assert_eq!(hedges, 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
}

#[tokio::test(start_paused = true)]
async fn hedge_both_refused_is_not_sent() {
    let (err, hedges) = hedged_failure(
        (Duration::from_millis(50), io::ErrorKind::ConnectionRefused),
        (Duration::from_millis(5), io::ErrorKind::ConnectionRefused),
    )
    .await;
    assert_eq!(hedges, 1);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
}

/// The same through the retry layer above (one attempt): the call's error keeps the delivery.
#[tokio::test(start_paused = true)]
async fn retry_over_hedge_keeps_maybe_processed() {
    let (layer, _handle) = HedgeLayer::new().pair();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_max_attempts(1).with_seed(7))
        .layer(layer)
        .service(hedged_api(
            (Duration::from_millis(5), io::ErrorKind::ConnectionRefused),
            (Duration::from_millis(5), io::ErrorKind::ConnectionReset),
        ));
    for _ in 0..150 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    // First copy refused at 50 ms... here at 5 ms, before the hedge is due: the call fails then
    // with a refusal; that one is NotSent and honest.
    let err = svc.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
}

// ---------------------------------------------------------------- retry deadline

/// An API: the n-th call (from 0) gets `script(n)`.
fn scripted(
    script: impl Fn(usize) -> Option<Result<StatusCode, io::ErrorKind>> + Send + Sync + 'static,
) -> (
    impl Service<
            Request<Body>,
            Response = Response<Body>,
            Error = BoxError,
            Future = impl Future<Output = Result<Response<Body>, BoxError>> + Send,
        > + Clone
        + Send,
    Arc<AtomicUsize>,
) {
    let n = Arc::new(AtomicUsize::new(0));
    let calls = n.clone();
    let script = Arc::new(script);
    let svc = tower::service_fn(move |_req: Request<Body>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        let what = script(i);
        async move {
            match what {
                None => std::future::pending().await,
                Some(Ok(s)) => {
                    let mut r = Response::new(Body::default());
                    *r.status_mut() = s;
                    Ok(r)
                }
                Some(Err(k)) => Err(io_err(k)),
            }
        }
    });
    (svc, calls)
}

/// retry.md: "its message names the root cause in plain words"; the commit under test: "the
/// retry layer's deadline error names the last failure (its error in the chain) and counts the
/// attempt in flight".
#[tokio::test(start_paused = true)]
async fn deadline_error_names_the_last_failure_and_counts_the_attempt_in_flight() {
    let (api, calls) = scripted(|n| match n {
        0 => Some(Err(io::ErrorKind::ConnectionReset)),
        _ => None,
    });
    let svc = RetryLayer::new()
        .with_deadline(Duration::from_secs(2))
        .with_seed(1)
        .layer(api);
    let t0 = Instant::now();
    let err = svc.oneshot(get()).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let e = sturdy_err(&err);
    let msg = e.to_string();
    assert!(msg.contains("connection reset"), "{msg}");
    assert_eq!(e.report().expect("a CallReport").attempts(), 2, "{msg}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let last = sturdy::core::find::<io::Error>(&*err).expect("the last attempt's error");
    assert_eq!(last.kind(), io::ErrorKind::ConnectionReset);
}

/// "Errors never claim 'not sent' for a call that may have reached the server": the last
/// *failure* was a refused connection (not sent), but the attempt in flight at the deadline may
/// have reached the server, so the call's error must say MaybeProcessed.
#[tokio::test(start_paused = true)]
async fn deadline_after_a_refusal_with_an_attempt_in_flight_is_maybe_processed() {
    let (api, calls) = scripted(|n| match n {
        0 => Some(Err(io::ErrorKind::ConnectionRefused)),
        _ => None,
    });
    let svc = RetryLayer::new()
        .with_deadline(Duration::from_secs(2))
        .with_seed(1)
        .layer(api);
    let req = Request::post("http://api.test/orders")
        .body(Body::from("{}"))
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "a refused POST is retried");
    let e = sturdy_err(&err);
    assert_eq!(e.report().unwrap().attempts(), 2, "{e}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{e}");
    assert!(
        !e.to_string().contains("safe to send again"),
        "must not invite a blind resend: {e}"
    );
}

/// A first attempt still running at the deadline, no failure before: one attempt, timed out.
#[tokio::test(start_paused = true)]
async fn deadline_with_only_an_attempt_in_flight() {
    let (api, _calls) = scripted(|_| None);
    let svc = RetryLayer::new()
        .with_deadline(Duration::from_millis(300))
        .layer(api);
    let err = svc.oneshot(get()).await.unwrap_err();
    let e = sturdy_err(&err);
    assert_eq!(e.report().unwrap().attempts(), 1, "{e}");
    assert_eq!(*e.kind(), ErrorKind::Timeout, "{e}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

/// A service that is ready once, answers 503, and then fails `poll_ready`.
#[derive(Clone)]
struct ReadyOnce {
    polls: Arc<AtomicUsize>,
}

impl Service<Request<Body>> for ReadyOnce {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Body>, BoxError>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.polls.fetch_add(1, Ordering::SeqCst) == 0 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Ready(Err(io_err(io::ErrorKind::BrokenPipe)))
        }
    }
    fn call(&mut self, _req: Request<Body>) -> Self::Future {
        let mut r = Response::new(Body::default());
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        std::future::ready(Ok(r))
    }
}

/// The commit under test: "a service that fails to become ready for a retry yields the call's
/// error with its report"; retry.md: "A final *error* is always one `sturdy_core::Error` that
/// speaks for the whole call".
#[tokio::test(start_paused = true)]
async fn poll_ready_failing_before_a_retry_gives_one_error_with_a_report() {
    for kept in [false, true] {
        let mut svc = RetryLayer::new().with_seed(3).layer(ReadyOnce {
            polls: Arc::default(),
        });
        let err = if kept {
            svc.ready().await.unwrap().call(get()).await.unwrap_err()
        } else {
            svc.oneshot(get()).await.unwrap_err()
        };
        let e = sturdy_err(&err);
        let report = e.report().expect("a CallReport");
        assert!(report.attempts() >= 1, "{e}");
        assert_eq!(report.delivery(), Delivery::MaybeProcessed, "{e}");
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{e}");
    }
}

// ---------------------------------------------------------------- auth

#[derive(Debug)]
struct FailsSecondTime {
    n: AtomicUsize,
    error: fn() -> BoxError,
}

impl TokenSource for FailsSecondTime {
    fn token(&self) -> sturdy::auth::BoxFuture<Result<Token, BoxError>> {
        let n = self.n.fetch_add(1, Ordering::SeqCst);
        let err = (self.error)();
        Box::pin(async move {
            if n == 0 {
                Ok(Token::new("t1", None))
            } else {
                Err(err)
            }
        })
    }
    fn invalidate(&self, _token: &Token) {}
}

/// auth.md: "After a 401, a failed token wait for the replay is different: the API saw the first
/// attempt and answered it, so the error says `Delivery::MaybeProcessed`, whatever the token
/// endpoint's failure was."
#[tokio::test(start_paused = true)]
async fn token_failure_after_a_401_is_maybe_processed() {
    let errors: [fn() -> BoxError; 3] = [
        || io_err(io::ErrorKind::ConnectionRefused),
        || {
            Box::new(SturdyError::new(
                ErrorKind::Connect,
                "token endpoint refused",
            ))
        },
        || {
            Box::new(
                SturdyError::new(ErrorKind::Connect, "no token").with_delivery(Delivery::NotSent),
            )
        },
    ];
    for error in errors {
        let source = Arc::new(FailsSecondTime {
            n: AtomicUsize::new(0),
            error,
        });
        let (api, calls) = scripted(|_| Some(Ok(StatusCode::UNAUTHORIZED)));
        let svc = AuthLayer::token_source(source).layer(api);
        let req = Request::post("http://api.test/pay")
            .body(Body::from("x"))
            .unwrap();
        let err = svc.oneshot(req).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let e = sturdy_err(&err);
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{e}");
        assert!(!e.to_string().contains("was not sent"), "{e}");
        assert!(!concerns_destination(&*err), "{e}");
    }
}

/// And before any send, a token failure is NotSent.
#[tokio::test(start_paused = true)]
async fn token_failure_before_sending_is_not_sent() {
    let source = Arc::new(FailsSecondTime {
        n: AtomicUsize::new(1),
        error: || io_err(io::ErrorKind::TimedOut),
    });
    let (api, calls) = scripted(|_| Some(Ok(StatusCode::OK)));
    let svc = AuthLayer::token_source(source).layer(api);
    let err = svc.oneshot(get()).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
}

// ---------------------------------------------------------------- fail-closed Redis store

/// A loopback TCP proxy to Redis that can be stopped (its listener and every connection closed).
struct Proxy {
    port: u16,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let t = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                t.lock().unwrap().push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        Self { port, tasks }
    }
    fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

fn redis_addr() -> Option<std::net::SocketAddr> {
    let url = std::env::var("STURDY_REDIS_URL").ok()?;
    let hostport = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    use std::net::ToSocketAddrs;
    hostport.to_socket_addrs().ok()?.next()
}

/// ratelimit.md: "`.with_on_store_error(OnStoreError::Fail)` fails calls when Redis is down";
/// the commit under test: "a fail-closed rate-limit store refusal is NotSent and not the
/// destination's (no breaker counts it)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_store_error_is_not_sent_and_not_counted_by_a_breaker() {
    let Some(addr) = redis_addr() else {
        eprintln!("STURDY_REDIS_URL not set: skipped");
        return;
    };
    tokio::time::timeout(Duration::from_secs(20), async move {
        let proxy = Proxy::start(addr).await;
        let quota = Quota::per_second(1000).unwrap();
        let remote = sturdy::redis::RedisQuota::connect(
            &format!("redis://127.0.0.1:{}/", proxy.port),
            quota,
        )
        .await
        .unwrap()
        .with_prefix(format!("outsider2:rl:{}", std::process::id()))
        .with_timeout(Duration::from_millis(200));
        let (api, calls) = scripted(|_| Some(Ok(StatusCode::OK)));
        let (breaker, circuit) = CircuitBreakerLayer::new()
            .with_consecutive_failures(2)
            .pair();
        let svc = ServiceBuilder::new()
            .layer(breaker)
            .layer(
                RateLimitLayer::new(quota)
                    .with_remote(Arc::new(remote))
                    .with_on_store_error(OnStoreError::Fail),
            )
            .service(api);
        // Redis up: calls go.
        svc.clone().oneshot(get()).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        proxy.stop();
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..6 {
            let started = Instant::now();
            let err = svc.clone().oneshot(get()).await.unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(2));
            assert_eq!(delivery(&*err), Delivery::NotSent, "call {i}: {err}");
            assert!(!concerns_destination(&*err), "call {i}: {err}");
            assert!(
                sturdy::core::find::<sturdy::core::CircuitOpen>(&*err).is_none(),
                "call {i}: the breaker opened on store errors: {err}"
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let state = circuit.state("api.test");
        assert!(
            matches!(state, None | Some(sturdy::circuit::CircuitState::Closed)),
            "{state:?}"
        );
    })
    .await
    .expect("bounded");
}

/// The same store error with the default (`OnStoreError::Allow`): "the default lets them through".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_on_store_error_lets_calls_through() {
    let Some(addr) = redis_addr() else {
        return;
    };
    tokio::time::timeout(Duration::from_secs(20), async move {
        let proxy = Proxy::start(addr).await;
        let quota = Quota::per_second(1000).unwrap();
        let remote = sturdy::redis::RedisQuota::connect(
            &format!("redis://127.0.0.1:{}/", proxy.port),
            quota,
        )
        .await
        .unwrap()
        .with_prefix(format!("outsider2:rla:{}", std::process::id()))
        .with_timeout(Duration::from_millis(200));
        let (api, calls) = scripted(|_| Some(Ok(StatusCode::OK)));
        let svc = RateLimitLayer::new(quota)
            .with_remote(Arc::new(remote))
            .layer(api);
        proxy.stop();
        for _ in 0..3 {
            svc.clone().oneshot(get()).await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    })
    .await
    .expect("bounded");
}

// ---------------------------------------------------------------- a 429 forever, composed

/// A server that answers every call with a bare 429, behind retry + adaptive limiter (the
/// `ClientBuilder` order): the call ends, in bounded time, with the 429 or a `RateLimited`.
#[tokio::test(start_paused = true)]
async fn retry_over_adaptive_limiter_against_429_forever_ends() {
    let (api, calls) = scripted(|_| Some(Ok(StatusCode::TOO_MANY_REQUESTS)));
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(5))
        .layer(RateLimitLayer::adaptive_only())
        .service(api);
    let t0 = Instant::now();
    for _ in 0..5 {
        match svc.clone().oneshot(get()).await {
            Ok(r) => assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS),
            Err(e) => assert!(sturdy::core::find::<RateLimited>(&*e).is_some(), "{e}"),
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    assert!(calls.load(Ordering::SeqCst) <= 20);
}

// ---------------------------------------------------------------- refused before sending

#[derive(Debug)]
struct BadToken;

impl TokenSource for BadToken {
    fn token(&self) -> sturdy::auth::BoxFuture<Result<Token, BoxError>> {
        Box::pin(async { Ok(Token::new("line\r\nX-Injected: 1", None)) })
    }
    fn invalidate(&self, _token: &Token) {}
}

/// The commit under test: "a token that cannot be a header value [is] refused before sending,
/// NotSent"; no secret in the message.
#[tokio::test(start_paused = true)]
async fn a_token_that_cannot_be_a_header_is_not_sent() {
    let (api, calls) = scripted(|_| Some(Ok(StatusCode::OK)));
    let svc = AuthLayer::token_source(Arc::new(BadToken)).layer(api);
    let req = Request::post("http://api.test/pay")
        .body(Body::from("x"))
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    let text = format!("{err} {err:?}");
    assert!(!text.contains("X-Injected"), "the token leaks: {text}");
}

/// A body that fails when read.
#[derive(Debug)]
struct BrokenBody(bool);

impl From<Bytes> for BrokenBody {
    fn from(_: Bytes) -> Self {
        Self(false)
    }
}

impl http_body::Body for BrokenBody {
    type Data = Bytes;
    type Error = io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, io::Error>>> {
        if self.0 {
            self.0 = false;
            Poll::Ready(Some(Err(io::Error::other("disk gone"))))
        } else {
            Poll::Ready(None)
        }
    }
}

/// The commit under test: "a body that cannot be read ... refused before sending, NotSent".
#[tokio::test(start_paused = true)]
async fn auth_with_an_unreadable_body_is_not_sent() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = tower::service_fn(move |_req: Request<BrokenBody>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(Response::new(Body::default())) }
    });
    let source = Arc::new(FailsSecondTime {
        n: AtomicUsize::new(0),
        error: || io_err(io::ErrorKind::Other),
    });
    let svc = AuthLayer::token_source(source).layer(api);
    let req = Request::post("http://api.test/pay")
        .body(BrokenBody(true))
        .unwrap();
    match svc.oneshot(req).await {
        Err(err) => {
            assert_eq!(calls.load(Ordering::SeqCst), 0, "{err}");
            assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
        }
        // Streaming the body to the API unread is also honest: then the API reports.
        Ok(_) => assert_eq!(calls.load(Ordering::SeqCst), 1),
    }
}

/// retry.md: "One longer than 60 s (...) is not slept: ... a 409 is returned as it is (the
/// server's answer, with a `CallReport` in its extensions)".
#[tokio::test(start_paused = true)]
async fn an_in_flight_409_past_the_wait_is_returned_with_a_report() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = tower::service_fn(move |_req: Request<Body>| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(409)
                    .header("retry-after", "120")
                    .body(Body::default())
                    .unwrap(),
            )
        }
    });
    let svc = RetryLayer::new().layer(api);
    let req = Request::post("http://api.test/pay")
        .header("idempotency-key", "k-outsider2-1")
        .body(Body::from("x"))
        .unwrap();
    let t0 = Instant::now();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let report = res
        .extensions()
        .get::<sturdy::core::CallReport>()
        .expect("a CallReport");
    assert_eq!(report.attempts(), 1);
    assert_eq!(report.idempotency_key(), Some("k-outsider2-1"));
}
