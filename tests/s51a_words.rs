#![cfg(feature = "full")]
//! s51a: the words of errors the docs quote (README.md, retry.md, auth.md, agents.md,
//! ratelimit.md, circuit.md, coalesce.md), provoked through the public API: in process on paused
//! time, and over real loopback sockets (the chaos server and small servers of our own) in real
//! time with millisecond settings.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::summary::{tool_result, ErrorSummary};
use sturdy::core::{classify, find, BoxError, CallOptions, Delivery, ErrorKind, RateLimited};
use sturdy::ratelimit::RateLimitLayer;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::s51a_util::{chain, get, post, resp, Api};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn sturdy_err(err: &BoxError) -> &sturdy::core::Error {
    err.downcast_ref::<sturdy::core::Error>()
        .unwrap_or_else(|| panic!("not a sturdy Error: {err:?}"))
}

/// README.md: "Errors say what happened and what to do: `rate limited by api.example.com; retry
/// after 2m`"; agents.md shows the tool result of that error:
/// `"rate limited by api.example.com; retry after 2m\nTry again in 2m; it may already have been
/// processed, so check before sending it again."`, `retry_after_ms` 120000, `attempts` 1.
#[tokio::test(start_paused = true)]
async fn s51a_readme_rate_limited_words_through_client_builder() {
    let api = Api::always(429, &[("retry-after", "120")]);
    let client = ClientBuilder::new().build(api.service::<Full<Bytes>>());
    let start = Instant::now();
    let err = client
        .oneshot(get("http://api.example.com/orders"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "not slept");
    assert_eq!(api.count(), 1);
    assert!(
        err.to_string()
            .contains("rate limited by api.example.com; retry after 2m"),
        "{}",
        chain(&*err)
    );
    let s = ErrorSummary::of(&*err);
    assert_eq!(s.kind, "rate_limited");
    assert_eq!(s.retry_after_ms, Some(120_000));
    assert!(s.retryable);
    assert!(s.may_have_been_processed, "the server answered the GET");
    assert_eq!(s.attempts, Some(1));
    let out = tool_result::<serde_json::Value>(Err(err));
    assert_eq!(out["isError"], true);
    let text = out["content"][0]["text"].as_str().unwrap();
    assert_eq!(
        text,
        "rate limited by api.example.com; retry after 2m\nTry again in 2m; it may already have been processed, so check before sending it again.",
    );
}

/// retry.md: "`the attempt timed out after 30s`" is the root cause a final error names; the
/// `ClientBuilder` attempt timeout is 30 s (README, RELIABILITY.md). A GET to a service that never
/// answers: 4 attempts of exactly 30 s each.
#[tokio::test(start_paused = true)]
async fn s51a_attempt_timeout_30s_words() {
    let api = Api::new(|_, _| Ok(resp(200, &[])));
    let inner = api.service::<Full<Bytes>>();
    let hang = tower::service_fn(move |r: Request<Full<Bytes>>| {
        let inner = inner.clone();
        async move {
            let _ = inner.oneshot(r).await;
            std::future::pending::<Result<Response<Full<Bytes>>, BoxError>>().await
        }
    });
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(4))
        .build(hang);
    let start = Instant::now();
    let err = client
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap_err();
    let t = api.offsets(start);
    assert_eq!(t.len(), 4);
    for w in t.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= secs(30) + ms(250) && gap <= secs(30) + secs(20),
            "gap {gap:?}"
        );
    }
    let msg = err.to_string();
    assert!(
        msg.contains("gave up after 4 attempts: the attempt timed out after 30s"),
        "{msg}"
    );
    assert_eq!(*sturdy_err(&err).kind(), ErrorKind::Timeout);
    assert_eq!(sturdy_err(&err).report().unwrap().attempts(), 4);
}

/// A TCP server on loopback that reads a request head and resets the connection (RST).
async fn resetting_server() -> std::net::SocketAddr {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            got.extend_from_slice(&buf[..n]);
                            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
                // Give the body a moment to arrive, then reset.
                tokio::time::sleep(Duration::from_millis(5)).await;
                #[allow(deprecated)]
                let _ = tcp.set_linger(Some(Duration::ZERO));
                drop(tcp);
            });
        }
    });
    addr
}

fn fast_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(Backoff::decorrelated_jitter(ms(1), ms(5)).unwrap())
        .with_seed(1)
}

/// README.md / retry.md: "`gave up after 4 attempts: connection reset by peer`"; for a POST
/// "`...; it may have been processed: retry with the same idempotency key <key>`", the key being
/// the one the report carries and the server saw.
#[tokio::test]
async fn s51a_reset_words_get_and_post_over_loopback() {
    let addr = resetting_server().await;
    let client = ClientBuilder::new()
        .with_retry(fast_retry())
        .build(sturdy_chaos::http_client());

    let err = client
        .clone()
        .oneshot(get(&format!("http://{addr}/x")))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("gave up after 4 attempts: connection reset by peer"),
        "{}",
        chain(&*err)
    );
    assert_eq!(*sturdy_err(&err).kind(), ErrorKind::Transport);

    let err = client
        .oneshot(post(&format!("http://{addr}/orders"), "{}"))
        .await
        .unwrap_err();
    let e = sturdy_err(&err);
    let key = e
        .report()
        .and_then(|r| r.idempotency_key())
        .expect("a key in the report")
        .to_owned();
    assert_eq!(e.report().unwrap().attempts(), 4);
    assert_eq!(e.report().unwrap().delivery(), Delivery::MaybeProcessed);
    let msg = err.to_string();
    assert!(
        msg.starts_with("gave up after 4 attempts: connection reset by peer"),
        "{msg}"
    );
    assert!(
        msg.ends_with(&format!(
            "; it may have been processed: retry with the same idempotency key {key}"
        )),
        "{msg}"
    );
}

/// retry.md: "for a POST or PATCH ... `...; the request was not sent, so it is safe to send
/// again` only when no attempt could have reached the server"; README: a refused connection is
/// retried even for a POST. A closed port on loopback.
#[tokio::test]
async fn s51a_refused_words_post_over_loopback() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = ClientBuilder::new()
        .with_retry(fast_retry())
        .build(sturdy_chaos::http_client());
    let err = client
        .oneshot(post(&format!("http://127.0.0.1:{port}/orders"), "{}"))
        .await
        .unwrap_err();
    let e = sturdy_err(&err);
    assert_eq!(*e.kind(), ErrorKind::Connect);
    assert_eq!(e.report().unwrap().delivery(), Delivery::NotSent);
    assert_eq!(
        e.report().unwrap().attempts(),
        4,
        "a refused POST is retried"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("gave up after 4 attempts: connection refused"),
        "{msg}"
    );
    assert!(
        msg.ends_with("; the request was not sent, so it is safe to send again"),
        "{msg}"
    );
    assert!(!msg.contains("may have been processed"), "{msg}");
    assert_eq!(classify::delivery(&*err), Delivery::NotSent);
}

/// README.md / demo.md: the default stack against the chaos server: two 503s then the order,
/// one key for all attempts, committed once; a 429 with `Retry-After: 120` fails at once with the
/// README's words, naming the host as the key (authority with its port).
#[tokio::test]
async fn s51a_chaos_default_stack_numbers_and_words() {
    let server = sturdy_chaos::ChaosServer::start(sturdy_chaos::Knobs {
        fail_next: 2,
        idempotency: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(fast_retry())
        .build(sturdy_chaos::http_client());
    let res = client
        .clone()
        .oneshot(post(&server.url("/orders"), r#"{"item":"book"}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(server.stats().orders_committed, 1);
    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 201]);

    server.update(|k| {
        k.rate_limit_next = 1;
        k.retry_after = sturdy_chaos::RetryAfterForm::Seconds(120);
    });
    let err = client
        .oneshot(get(&server.url("/orders")))
        .await
        .unwrap_err();
    let want = format!("rate limited by {}; retry after 2m", server.addr());
    assert!(err.to_string().contains(&want), "{}", chain(&*err));
    assert_eq!(find::<RateLimited>(&*err).unwrap().retry_after(), secs(120));
}

/// ratelimit.md: "Past the most limiters kept (`with_max_keys`), new keys share one overflow
/// limiter: a refusal then names it ("rate limited by the overflow limiter shared by the keys
/// past the most limiters kept")".
#[tokio::test(start_paused = true)]
async fn s51a_overflow_limiter_refusal_words() {
    let api = Api::new(|_, parts| {
        Ok(if parts.uri.host() == Some("d.test") {
            resp(200, &[])
        } else {
            resp(429, &[("retry-after", "100")])
        })
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().with_max_keys(1).pair();
    let svc = layer.layer(api.service::<Full<Bytes>>());
    // b.test: the one limiter kept, paused (so not idle); c.test: past the bound, pauses the
    // overflow limiter; d.test: past the bound, refused by the overflow limiter's pause.
    for host in ["b.test", "c.test"] {
        let r = svc
            .clone()
            .oneshot(get(&format!("http://{host}/x")))
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
    }
    let paused: Vec<String> = handle.paused().into_iter().map(|(k, _)| k).collect();
    assert!(paused.contains(&"*".to_owned()), "{paused:?}");
    let err = svc
        .clone()
        .oneshot(get("http://d.test/x"))
        .await
        .unwrap_err();
    let msg = chain(&*err);
    assert!(
        msg.contains(
            "rate limited by the overflow limiter shared by the keys past the most limiters kept"
        ),
        "{msg}"
    );
    assert_eq!(api.count(), 2);
}

/// circuit.md: "`Failing` ("it has been failing ... try again in 12s")".
#[tokio::test(start_paused = true)]
async fn s51a_circuit_failing_words() {
    let api = Api::always(503, &[]);
    let svc = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .layer(api.service::<Full<Bytes>>());
    let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    tokio::time::advance(secs(18)).await;
    let err = svc.oneshot(get("http://a.test/x")).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("it has been failing"), "{msg}");
    assert!(msg.contains("try again in 12s"), "{msg}");
    assert!(msg.contains("a.test"), "{msg}");
}

/// A body that never yields a frame.
struct Stalled;
impl http_body::Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
}

/// coalesce.md: "past 30 s from the head (`.with_body_timeout(d)`), each caller gets a `Timeout`
/// error ("the shared response's body did not arrive within 30s of its head")".
#[tokio::test(start_paused = true)]
async fn s51a_coalesce_body_timeout_30s_words() {
    let upstream = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Stalled))
    });
    let svc = CoalesceLayer::new().layer(upstream);
    let start = Instant::now();
    let a = tokio::spawn(svc.clone().oneshot(get("http://a.test/x")));
    let b = tokio::spawn(svc.clone().oneshot(get("http://a.test/x")));
    for h in [a, b] {
        let Err(err) = h.await.unwrap() else {
            panic!("a stalled body was handed out")
        };
        assert_eq!(start.elapsed(), secs(30));
        let msg = chain(&*err);
        assert!(
            msg.contains("the shared response's body did not arrive within 30s of its head"),
            "{msg}"
        );
        assert_eq!(*sturdy_err(&err).kind(), ErrorKind::Timeout);
    }
}

/// auth.md: "`AuthLayer::with_token_timeout(d)` \[30 s\] ... Past it the call fails with a
/// `sturdy_core::Error` of kind `Timeout` (retryable) naming the token endpoint, e.g. `no access
/// token from the token endpoint https://auth.example.com/oauth/token within 30s; the request was
/// not sent. Retryable: ...`"; "Messages name the token URL without its user info or query."
#[tokio::test(start_paused = true)]
async fn s51a_token_timeout_30s_words() {
    let token_client = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
    });
    let cc = ClientCredentials::new(
        token_client,
        "https://user:pw@auth.example.com/oauth/token?tenant=t0psecret",
        "id",
        "my-secret",
    )
    .unwrap()
    .with_request_timeout(secs(600));
    let api = Api::always(200, &[]);
    let auth = AuthLayer::oauth2(cc);
    assert_eq!(auth.token_timeout(), secs(30));
    let svc = auth.layer(api.service::<Full<Bytes>>());
    let start = Instant::now();
    let err = svc
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), secs(30));
    assert_eq!(api.count(), 0);
    let e = sturdy_err(&err);
    assert_eq!(*e.kind(), ErrorKind::Timeout);
    assert!(e.is_retryable());
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "no access token from the token endpoint https://auth.example.com/oauth/token within 30s; the request was not sent. Retryable: "
        ),
        "{msg}"
    );
    for secret in ["pw", "t0psecret", "my-secret", "user:"] {
        assert!(!chain(&*err).contains(secret), "{secret} in {msg}");
    }
    assert_eq!(classify::delivery(&*err), Delivery::NotSent);
}

/// auth.md: "`the token endpoint https://auth.example.com/oauth/token refused the token request
/// with invalid_client (401 Unauthorized): the client id or secret is wrong...`"; "The server's
/// own words (its `error` and `error_description`, cut to 64 and 200 characters) are quoted with
/// the client secret ... replaced by `[redacted]`".
#[tokio::test(start_paused = true)]
async fn s51a_invalid_client_words_and_cuts() {
    let long_desc = format!("echo my-secret-value {}", "d".repeat(300));
    let body = serde_json::json!({
        "error": "invalid_client",
        "error_description": long_desc,
    })
    .to_string();
    let token_client = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let body = body.clone();
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(401)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
        }
    });
    let cc = ClientCredentials::new(
        token_client,
        "https://auth.example.com/oauth/token",
        "id",
        "my-secret-value",
    )
    .unwrap();
    let api = Api::always(200, &[]);
    let svc = AuthLayer::oauth2(cc).layer(api.service::<Full<Bytes>>());
    let err = svc
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "the token endpoint https://auth.example.com/oauth/token refused the token request with invalid_client (401 Unauthorized): the client id or secret is wrong"
        ),
        "{msg}"
    );
    assert!(!chain(&*err).contains("my-secret-value"), "{msg}");
    assert!(msg.contains("[redacted]"), "{msg}");
    // The description is cut to 200 characters.
    assert!(msg.contains(&"d".repeat(100)), "{msg}");
    assert!(!msg.contains(&"d".repeat(200)), "{msg}");
    assert!(
        !sturdy_err(&err).is_retryable(),
        "invalid_client is not retryable"
    );
}

/// retry.md: "(`gave up after 1 attempt and 1 refused try: 503 Service Unavailable; the try after
/// it was refused before it was sent: the concurrency limit for api.example.com (1 call at once)
/// stayed full for 0ms; ...`)": a GET answered 503, whose retry a full concurrency limit of 1 with
/// no wait refuses.
#[tokio::test(start_paused = true)]
async fn s51a_refused_try_words_concurrency() {
    use sturdy::concurrency::AdaptiveConcurrencyLayer;
    let api = Api::new(|n, _| Ok(resp(if n == 0 { 503 } else { 200 }, &[])));
    let inner = api.service::<Full<Bytes>>();
    // Calls after the first hold their place for 10 s.
    let svc_inner = tower::service_fn(move |r: Request<Full<Bytes>>| {
        let inner = inner.clone();
        let slow = r.uri().path() == "/slow";
        async move {
            if slow {
                tokio::time::sleep(secs(10)).await;
            }
            inner.oneshot(r).await
        }
    });
    let conc = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO);
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(1).with_max_attempts(2))
        .with_adaptive_concurrency(conc)
        .build(svc_inner);
    // The first call: 503 at once; while it sleeps before its retry, another call takes the place.
    let first = tokio::spawn(client.clone().oneshot(get("http://api.example.com/x")));
    tokio::task::yield_now().await;
    tokio::time::sleep(ms(1)).await;
    let holder = tokio::spawn(client.clone().oneshot(get("http://api.example.com/slow")));
    let err = first.await.unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("gave up after 1 attempt and 1 refused try: 503 Service Unavailable; the try after it was refused before it was sent: the concurrency limit for api.example.com (1 call at once) stayed full for 0ms"),
        "{msg}"
    );
    assert_eq!(sturdy_err(&err).report().unwrap().attempts(), 1);
    holder.await.unwrap().unwrap();
}

/// agents.md: "`ErrorSummary::advice()` is the second line of the text: one sentence ("Try again
/// in 30s; the request was not processed.", ...)" and the table: `retry_after_ms` is "a server's
/// wait capped at 5 min". A hostile `Retry-After` on a call given up on.
#[tokio::test(start_paused = true)]
async fn s51a_summary_of_hostile_retry_after_is_capped() {
    let api = Api::always(503, &[("retry-after", "99999999999999999999")]);
    let client = ClientBuilder::new().build(api.service::<Full<Bytes>>());
    let mut req = get("http://api.example.com/x");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::MAX));
    let err = client.oneshot(req).await.unwrap_err();
    let s = ErrorSummary::of(&*err);
    assert_eq!(s.retry_after_ms, Some(300_000), "{s:?}");
    assert!(s.message.contains("retry after 5m"), "{}", s.message);
    assert!(s.advice().starts_with("Try again in 5m"), "{}", s.advice());
}

/// circuit.md: "`Probing` (half-open, its probes out: "try again once they have answered",
/// `retry_in` zero), `Forced` (held open through the handle until released)"; CircuitOpen
/// rustdoc: `retry_in` is "the longest open period for a forced breaker" (5 min by default);
/// retry.md: `report()` gives "the number of attempts (sent on, so 0 when every try was
/// refused)".
#[tokio::test(start_paused = true)]
async fn s51a_circuit_probing_and_forced_words() {
    use sturdy::core::OpenReason;
    let api = Api::new(|n, _| Ok(resp(if n == 0 { 503 } else { 200 }, &[])));
    let inner = api.service::<Full<Bytes>>();
    let slow = tower::service_fn(move |r: Request<Full<Bytes>>| {
        let inner = inner.clone();
        let slow = r.uri().path() == "/slow";
        async move {
            if slow {
                tokio::time::sleep(secs(10)).await;
            }
            inner.oneshot(r).await
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = layer.layer(slow);
    let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    tokio::time::advance(secs(30)).await;
    let probe = tokio::spawn(svc.clone().oneshot(get("http://a.test/slow")));
    tokio::task::yield_now().await;
    tokio::time::sleep(ms(1)).await;
    let err = svc
        .clone()
        .oneshot(get("http://a.test/x"))
        .await
        .unwrap_err();
    let open = find::<sturdy::core::CircuitOpen>(&*err).expect("CircuitOpen");
    assert_eq!(open.reason(), OpenReason::Probing);
    assert_eq!(open.retry_in(), Duration::ZERO);
    assert!(
        err.to_string()
            .contains("try again once they have answered"),
        "{err}"
    );
    probe.await.unwrap().unwrap();

    // Forced, through the whole client: refused at once, 0 attempts, not sent.
    let (layer, handle2) = CircuitBreakerLayer::new().pair();
    let api = Api::always(200, &[]);
    let client = ClientBuilder::new()
        .with_circuit_breaker(layer)
        .build(api.service::<Full<Bytes>>());
    handle2.force_open("b.test");
    let err = client
        .oneshot(post("http://b.test/orders", "{}"))
        .await
        .unwrap_err();
    assert_eq!(api.count(), 0);
    let open = find::<sturdy::core::CircuitOpen>(&*err).expect("CircuitOpen");
    assert_eq!(open.reason(), OpenReason::Forced);
    assert_eq!(open.retry_in(), secs(300));
    let e = sturdy_err(&err);
    assert_eq!(e.report().unwrap().attempts(), 0);
    assert_eq!(e.report().unwrap().delivery(), Delivery::NotSent);
    let msg = err.to_string();
    assert!(
        msg.ends_with("; the request was not sent, so it is safe to send again"),
        "{msg}"
    );
    let _ = handle;
}
