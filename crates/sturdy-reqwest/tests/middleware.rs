//! `SturdyMiddleware` in reqwest-middleware chains, against the chaos server, in real time.

#![cfg(feature = "middleware")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Extensions, StatusCode};
use http_body_util::{Full, StreamBody};
use reqwest_middleware::{ClientWithMiddleware, Middleware, Next};
use serde_json::json;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use sturdy_chaos::{ChaosServer, Knobs, RetryAfterForm};
use sturdy_core::trace::TraceEvent;
use sturdy_core::{CallOptions, Delivery, ErrorKind, Trace};
use sturdy_reqwest::{delivery, find, NextAttempt, ReqwestService, SturdyMiddleware};
use tower::ServiceExt;

fn retry() -> RetryLayer {
    let backoff =
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(20)).unwrap();
    RetryLayer::new().with_backoff(backoff).with_seed(7)
}

fn sturdy() -> SturdyMiddleware {
    SturdyMiddleware::new(|next| ClientBuilder::new().with_retry(retry()).build(next))
}

fn client(reqwest: reqwest::Client) -> ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest)
        .with(sturdy())
        .build()
}

/// Counts the requests that pass it.
#[derive(Clone, Default)]
struct Count(Arc<AtomicU32>);

#[async_trait::async_trait]
impl Middleware for Count {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        self.0.fetch_add(1, Ordering::Relaxed);
        next.run(req, extensions).await
    }
}

impl Count {
    fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn traits() {
    fn clone_send_sync<T: Clone + Send + Sync + 'static>() {}
    clone_send_sync::<SturdyMiddleware>();
    clone_send_sync::<NextAttempt>();
}

#[tokio::test]
async fn server_errors_are_retried_and_the_request_builder_is_kept() {
    let s = ChaosServer::start(Knobs {
        fail_next: 2,
        idempotency: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let res = client(reqwest::Client::new())
        .post(s.url("/orders"))
        .query(&[("source", "test")])
        .json(&json!({"item": "book"}))
        .bearer_auth("not-checked")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    // reqwest's response, with the URL it came from and the peer it came from.
    assert_eq!(res.url().as_str(), s.url("/orders?source=test"));
    assert_eq!(res.remote_addr(), Some(s.addr()));
    let order: serde_json::Value = res.json().await.unwrap();
    assert_eq!(order["item"], "book");
    let reqs = s.requests();
    let seen: Vec<(&str, u16)> = reqs.iter().map(|r| (r.path.as_str(), r.status)).collect();
    assert_eq!(
        seen,
        [
            ("/orders?source=test", 503),
            ("/orders?source=test", 503),
            ("/orders?source=test", 201)
        ]
    );
    assert_eq!(s.stats().orders_committed, 1);
}

#[tokio::test]
async fn retry_after_on_429_is_honoured() {
    let s = ChaosServer::start(Knobs {
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Seconds(1),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let started = tokio::time::Instant::now();
    let res = client(reqwest::Client::new())
        .get(s.url("/orders/o_1"))
        .send()
        .await
        .unwrap();
    // The seeded order does not exist: the server's 404 comes back as a response.
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let reqs = s.requests();
    assert_eq!(reqs.len(), 2);
    assert!(
        reqs[1].at - reqs[0].at >= Duration::from_millis(950),
        "{reqs:?}"
    );
}

#[tokio::test]
async fn a_reset_after_commit_is_booked_once() {
    let s = ChaosServer::start(Knobs {
        reset_after_commit_next: 1,
        idempotency: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let res = client(reqwest::Client::new())
        .post(s.url("/orders"))
        .json(&json!({"item": "lamp"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let st = s.stats();
    assert_eq!(
        (st.resets, st.orders_committed, st.duplicates_by_key),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn reqwest_timeouts_bound_each_attempt_and_are_retried() {
    let s = ChaosServer::start(Knobs {
        latency: Duration::from_millis(300),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let err = client(reqwest::Client::new())
        .post(s.url("/orders"))
        .json(&json!({"item": "book"}))
        .timeout(Duration::from_millis(30))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_middleware());
    let e = find::<sturdy_core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    let report = e.report().unwrap();
    assert_eq!(report.attempts(), 4);
    let key = report.idempotency_key().unwrap().to_owned();
    assert_eq!(
        err.to_string(),
        format!(
            "gave up after 4 attempts: timed out (reqwest's timeout); it may have been processed: retry with the same idempotency key {key}"
        )
    );
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    // The attempt's reqwest error is in the chain.
    assert!(find::<reqwest::Error>(&err).unwrap().is_timeout());
}

#[tokio::test]
async fn a_refused_connection_is_retried_and_reported_as_maybe_processed() {
    let err = client(reqwest::Client::new())
        .get(format!("http://127.0.0.1:{}/orders", closed_port()))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection refused"
    );
    assert_eq!(
        find::<sturdy_core::Error>(&err).unwrap().kind(),
        &ErrorKind::Connect
    );
    // reqwest may have followed a redirect before the refused connection: sturdy cannot tell.
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
}

#[tokio::test]
async fn oauth2_tokens_are_refreshed_after_a_401() {
    let s = ChaosServer::start(Knobs {
        require_auth: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let reqwest = reqwest::Client::new();
    let tokens = ClientCredentials::new(
        ReqwestService::new(reqwest.clone()),
        &s.url("/oauth/token"),
        "client",
        "secret",
    )
    .unwrap();
    let auth = AuthLayer::oauth2(tokens);
    let client = reqwest_middleware::ClientBuilder::new(reqwest)
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_retry(retry())
                .with_auth(auth)
                .build(next)
        }))
        .build();
    let first = client
        .post(s.url("/orders"))
        .json(&json!({"n": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    s.revoke_tokens();
    let second = client
        .post(s.url("/orders"))
        .json(&json!({"n": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::CREATED);
    let st = s.stats();
    assert_eq!(
        (st.tokens_issued, st.unauthorized, st.orders_committed),
        (2, 1, 2)
    );
}

#[tokio::test]
async fn a_token_that_expires_sooner_than_announced_is_replaced() {
    // Tokens announce an hour and expire after 300 ms; a 429 makes the call wait a second.
    let s = ChaosServer::start(Knobs {
        require_auth: true,
        token_lifetime: Duration::from_millis(300),
        token_expires_in: Some(json!(3600)),
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Seconds(1),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let reqwest = reqwest::Client::new();
    let tokens = ClientCredentials::new(
        ReqwestService::new(reqwest.clone()),
        &s.url("/oauth/token"),
        "client",
        "secret",
    )
    .unwrap();
    let auth = AuthLayer::oauth2(tokens);
    let client = reqwest_middleware::ClientBuilder::new(reqwest)
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_retry(retry())
                .with_auth(auth)
                .build(next)
        }))
        .build();
    let res = client
        .post(s.url("/orders"))
        .json(&json!({"n": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let seen: Vec<u16> = s
        .requests()
        .iter()
        .filter(|r| r.path == "/orders")
        .map(|r| r.status)
        .collect();
    assert_eq!(seen, [429, 401, 201]);
    let st = s.stats();
    assert_eq!((st.tokens_issued, st.orders_committed), (2, 1));
}

#[tokio::test]
async fn middlewares_after_sturdy_see_every_attempt_and_those_before_see_the_call() {
    let s = ChaosServer::start(Knobs {
        fail_next: 2,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let (before, after) = (Count::default(), Count::default());
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(before.clone())
        .with(sturdy())
        .with(after.clone())
        .build();
    let res = client.get(s.url("/orders/o_1")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!((before.get(), after.get()), (1, 3));
}

#[tokio::test]
async fn call_options_and_traces_given_as_extensions_reach_the_stack() {
    let s = ChaosServer::start(Knobs {
        fail_next: 1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = client(reqwest::Client::new());

    // No retries for this call: the 503 is the answer.
    let res = client
        .get(s.url("/orders/o_1"))
        .with_extension(CallOptions::new().without_retries())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(s.requests().len(), 1);

    s.update(|k| k.fail_next = 1);
    let trace = Trace::new();
    let res = client
        .post(s.url("/orders"))
        .json(&json!({"n": 1}))
        .with_extension(trace.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let attempts: Vec<String> = trace
        .events()
        .into_iter()
        .filter_map(|e| match e {
            TraceEvent::Attempt { outcome, .. } => Some(outcome),
            _ => None,
        })
        .collect();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert!(attempts[0].starts_with("503"), "{attempts:?}");
    assert!(attempts[1].starts_with("201"), "{attempts:?}");
}

/// Puts a marker in the extensions of each attempt.
struct Mark;

#[derive(Clone)]
struct Marked;

#[async_trait::async_trait]
impl Middleware for Mark {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        extensions.insert(Marked);
        next.run(req, extensions).await
    }
}

/// Records whether the extensions hold the marker once the call is over.
#[derive(Clone, Default)]
struct SeeMark(Arc<Mutex<Option<bool>>>);

#[async_trait::async_trait]
impl Middleware for SeeMark {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let res = next.run(req, extensions).await;
        *self.0.lock().unwrap() = Some(extensions.get::<Marked>().is_some());
        res
    }
}

#[tokio::test]
async fn the_last_attempts_extensions_come_back_to_the_call() {
    let s = ChaosServer::start(Knobs::default()).await.unwrap();
    let seen = SeeMark::default();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(seen.clone())
        .with(sturdy())
        .with(Mark)
        .build();
    client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(*seen.0.lock().unwrap(), Some(true));
}

fn stream(bytes: &'static [u8]) -> reqwest::Body {
    reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter([Ok::<
        _,
        Infallible,
    >(
        http_body::Frame::data(Bytes::from_static(bytes)),
    )])))
}

#[tokio::test]
async fn streaming_bodies_are_buffered_up_to_the_limit() {
    let s = ChaosServer::start(Knobs::default()).await.unwrap();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(sturdy().with_body_limit(32))
        .build();

    let res = client
        .post(s.url("/orders"))
        .header("content-type", "application/json")
        .body(stream(br#"{"item":"book"}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(s.orders().last().unwrap()["item"], "book");

    let err = client
        .post(s.url("/orders"))
        .header("content-type", "application/json")
        .body(stream(br#"{"item":"a book with a very long title"}"#))
        .send()
        .await
        .unwrap_err();
    let e = find::<sturdy_core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Body);
    assert!(
        err.to_string()
            .starts_with("the request body is a stream longer than 32 bytes"),
        "{err}"
    );
    assert_eq!(delivery(&err), Delivery::NotSent);
    assert_eq!(s.stats().orders_committed, 1);
}

#[tokio::test]
async fn next_attempt_alone_refuses_requests() {
    let err = NextAttempt::clone(&{
        let mut out = None;
        let _ = SturdyMiddleware::new(|next| {
            out = Some(next.clone());
            next
        });
        out.unwrap()
    })
    .oneshot(
        http::Request::get("http://127.0.0.1:1/")
            .body(Full::<Bytes>::default())
            .unwrap(),
    )
    .await
    .unwrap_err();
    let e = err.downcast_ref::<sturdy_core::Error>().unwrap();
    assert_eq!(e.kind(), &ErrorKind::Config);
}

/// Records when an attempt starts, finishes, or is dropped unfinished.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<&'static str>>>);

struct OnDrop(Events, bool);

impl Drop for OnDrop {
    fn drop(&mut self) {
        let what = if self.1 { "done" } else { "cancelled" };
        self.0 .0.lock().unwrap().push(what);
    }
}

#[async_trait::async_trait]
impl Middleware for Events {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        self.0.lock().unwrap().push("start");
        let mut guard = OnDrop(self.clone(), false);
        let res = next.run(req, extensions).await;
        guard.1 = true;
        res
    }
}

#[tokio::test]
async fn an_attempt_the_stack_gave_up_on_is_cancelled() {
    let s = ChaosServer::start(Knobs {
        latency: Duration::from_millis(300),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let events = Events::default();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_retry(retry())
                .with_attempt_timeout(Duration::from_millis(30))
                .build(next)
        }))
        .with(events.clone())
        .build();
    let err = client.get(s.url("/orders/o_1")).send().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: the attempt timed out after 30ms"
    );
    // Each attempt is cancelled when its timeout fires, before the next one starts.
    assert_eq!(
        *events.0.lock().unwrap(),
        [
            "start",
            "cancelled",
            "start",
            "cancelled",
            "start",
            "cancelled",
            "start",
            "cancelled"
        ]
    );
}

/// The docs: `find` looks "in either variant ... as `sturdy_core::find` does", naming
/// `find::<CircuitOpen>`. When a try is refused after an attempt that was sent, the retry layer
/// keeps the refusal beside the cause (`Error::related`), not in the `source()` chain: `find`
/// must reach it there too.
#[tokio::test]
async fn find_reaches_a_refusal_kept_beside_a_sent_attempt() {
    let s = ChaosServer::start(Knobs {
        fail_next: 5,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let mw = SturdyMiddleware::new(|next| {
        ClientBuilder::new()
            .with_retry(retry().with_max_attempts(2))
            .with_circuit_breaker(
                sturdy::circuit::CircuitBreakerLayer::new().with_consecutive_failures(1),
            )
            .build(next)
    });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(mw)
        .build();
    let err = client.get(s.url("/orders")).send().await.unwrap_err();
    // One attempt reached the server (its 503 opened the breaker); the second try was refused.
    assert_eq!(s.requests().len(), 1, "{err:?}");
    let open = find::<sturdy_core::CircuitOpen>(&err);
    assert!(open.is_some(), "{err:?}");
    assert_eq!(
        open.map(|o| o.retry_in() > Duration::ZERO),
        Some(true),
        "{err:?}"
    );
    // The call's own error is found as before.
    assert!(find::<sturdy_core::Error>(&err).is_some(), "{err:?}");
}

/// A middleware after sturdy's that sends the request and then fails with an error of its own
/// (as a retry middleware does after its last try), whose text holds a URL with a secret.
#[derive(Clone)]
struct SendsThenFails;

#[async_trait::async_trait]
impl Middleware for SendsThenFails {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let url = req.url().clone();
        let _ = next.run(req, extensions).await;
        Err(reqwest_middleware::Error::Middleware(anyhow::anyhow!(
            "gave up after 3 tries for url ({url}): connection refused"
        )))
    }
}

/// What another middleware below sturdy did before its error is not known: it may have sent
/// the request, so the call may have been processed (it read "not sent" when the error's words
/// or chain named a refused connection). No URL query from its text reaches `Display` or
/// `Debug`.
#[tokio::test]
async fn an_error_of_a_middleware_below_may_have_been_processed_and_shows_no_query() {
    let s = ChaosServer::start(Knobs::default()).await.unwrap();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(sturdy())
        .with(SendsThenFails)
        .build();
    let err = client
        .post(format!("{}?api_key=s3cr3t", s.url("/orders")))
        .json(&json!({"item": "book"}))
        .send()
        .await
        .unwrap_err();
    // The request reached the server once (a POST without a key is not retried).
    assert_eq!(s.stats().orders_committed, 1, "{err:?}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{err:?}");
    let shown = format!("{err} {err:?} {err:#}");
    assert!(!shown.contains("s3cr3t"), "{shown}");
    assert!(shown.contains("/orders"), "{shown}");
}

/// Waits a few milliseconds (a token fetch, a limiter) before the rest of the chain.
struct WaitsFirst;

#[async_trait::async_trait]
impl Middleware for WaitsFirst {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        next.run(req, extensions).await
    }
}

fn waiting_chain() -> ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(sturdy())
        .with(WaitsFirst)
        .build()
}

/// This crate's tests build reqwest without a TLS feature. A redirect to `https` after the
/// server answered may have been processed, and says it was a redirect, behind a middleware
/// that waits first. (reqwest's error names the first URL even for the redirect's target, so
/// the URL cannot tell this from an `https` first hop behind such a middleware, which reads the
/// same: see the reqwest guide's table.)
#[tokio::test]
async fn a_redirect_to_https_without_a_tls_backend_may_have_been_processed() {
    let hits = Arc::new(AtomicU32::new(0));
    let counted = hits.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/start",
        axum::routing::post(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                (
                    StatusCode::SEE_OTHER,
                    [("location", format!("https://{addr}/orders/o_1"))],
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        waiting_chain()
            .post(format!("http://{addr}/start"))
            .body("order")
            .send(),
    )
    .await
    .expect("answers")
    .unwrap_err();
    assert_eq!(hits.load(Ordering::SeqCst), 1, "{err}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{err}");
    let e = find::<sturdy_core::Error>(&err).expect("a sturdy error");
    assert!(
        e.to_string().starts_with("could not follow a redirect"),
        "{e}"
    );
}
