//! `ReqwestService` at the bottom of sturdy stacks, against the chaos server and small loopback
//! servers, in real time.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::Redirect;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use sturdy_chaos::{ChaosServer, Knobs, RetryAfterForm};
use sturdy_core::classify::{classify_error, delivery};
use sturdy_core::{find, Delivery, ErrorKind};
use sturdy_reqwest::{ReqwestService, ResponseBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

fn retry() -> RetryLayer {
    let backoff =
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(20)).unwrap();
    RetryLayer::new().with_backoff(backoff).with_seed(7)
}

fn order(n: u32) -> Request<Full<Bytes>> {
    Request::post("http://placeholder/orders")
        .header("content-type", "application/json")
        .body(Full::from(format!(r#"{{"item":"book","n":{n}}}"#)))
        .unwrap()
}

fn to(url: &str, mut req: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    *req.uri_mut() = url.parse().unwrap();
    req
}

/// A loopback port on which nothing listens.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn serve(app: Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[test]
fn traits() {
    fn clone_send_sync<T: Clone + Send + Sync + 'static>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let mut http = ReqwestService::new(reqwest::Client::new());
    clone_send_sync(&http);
    let client = ClientBuilder::new().build(http.clone());
    clone_send_sync(&client);
    let fut = http.call(Request::new(Full::<Bytes>::default()));
    send(&fut);
    fn body_send_sync<T: Send + Sync>() {}
    body_send_sync::<ResponseBody>();
}

#[tokio::test]
async fn server_errors_are_retried_with_one_idempotency_key() {
    let s = ChaosServer::start(Knobs {
        fail_next: 2,
        idempotency: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(retry())
        .build(ReqwestService::new(reqwest::Client::new()));
    let res = client
        .oneshot(to(&s.url("/orders"), order(1)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let order: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(order["item"], "book");
    let seen: Vec<u16> = s.requests().iter().map(|r| r.status).collect();
    assert_eq!(seen, [503, 503, 201]);
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
    let client = ClientBuilder::new()
        .with_retry(retry())
        .build(ReqwestService::new(reqwest::Client::new()));
    let started = tokio::time::Instant::now();
    let res = client
        .oneshot(to(&s.url("/orders"), order(1)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    // Never sooner than the server asked.
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
    assert_eq!(s.stats().rate_limited, 1);
}

#[tokio::test]
async fn a_reset_after_commit_is_retried_with_the_same_key_and_booked_once() {
    let s = ChaosServer::start(Knobs {
        reset_after_commit_next: 1,
        idempotency: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(retry())
        .build(ReqwestService::new(reqwest::Client::new()));
    let res = client
        .oneshot(to(&s.url("/orders"), order(1)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let st = s.stats();
    assert_eq!((st.resets, st.orders_committed, st.replayed), (1, 1, 1));
}

#[tokio::test]
async fn a_reset_is_a_transport_error_that_may_have_been_processed() {
    let s = ChaosServer::start(Knobs {
        reset_after_commit_next: 1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let err = ReqwestService::new(reqwest::Client::new())
        .oneshot(to(&s.url("/orders"), order(1)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Transport);
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert_eq!(
        err.to_string(),
        "the connection closed before the response was complete"
    );
    assert!(std::error::Error::source(&err)
        .unwrap()
        .is::<reqwest::Error>());
}

#[tokio::test]
async fn reqwest_timeouts_are_timeouts_and_are_retried() {
    let s = ChaosServer::start(Knobs {
        latency: Duration::from_millis(300),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let reqwest = reqwest::Client::builder()
        .timeout(Duration::from_millis(30))
        .build()
        .unwrap();
    let http = ReqwestService::new(reqwest);

    // One attempt: a timeout, in sturdy's terms.
    let get = || {
        Request::get(s.url("/orders/o_1"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let err = http.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Timeout);
    assert_eq!(classify_error(&err), ErrorKind::Timeout);
    assert!(err.is_retryable());
    assert_eq!(err.to_string(), "timed out (reqwest's timeout)");
    assert!(std::error::Error::source(&err)
        .unwrap()
        .downcast_ref::<reqwest::Error>()
        .unwrap()
        .is_timeout());

    // Through the stack: retried, then reported for the whole call.
    let client = ClientBuilder::new().with_retry(retry()).build(http);
    let err = client.oneshot(get()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: timed out (reqwest's timeout)"
    );
    let e = find::<sturdy_core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert_eq!(e.report().unwrap().attempts(), 4);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error_that_may_have_been_a_redirect_target() {
    let url = format!("http://127.0.0.1:{}/orders", closed_port());
    let http = ReqwestService::new(reqwest::Client::new());
    let err = http.clone().oneshot(to(&url, order(1))).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Connect);
    assert_eq!(err.to_string(), "connection refused");
    // reqwest may have followed a redirect before it: sturdy cannot tell.
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);

    let client = ClientBuilder::new().with_retry(retry()).build(http);
    let get = Request::get(url.clone())
        .body(Full::<Bytes>::default())
        .unwrap();
    let err = client.clone().oneshot(get).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection refused"
    );
    assert_eq!(
        find::<sturdy_core::Error>(&*err).unwrap().kind(),
        &ErrorKind::Connect
    );

    // A POST with its idempotency key (ClientBuilder gives it one) is retried too, with the
    // same key, and the caller is told to keep it.
    let err = client.oneshot(to(&url, order(1))).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("gave up after 4 attempts: connection refused; it may have been processed: retry with the same idempotency key "),
        "{text}"
    );
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

#[tokio::test]
async fn a_revoked_token_is_refreshed_and_the_call_replayed() {
    let s = ChaosServer::start(Knobs {
        require_auth: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let http = ReqwestService::new(reqwest::Client::new());
    // Token requests go through reqwest too.
    let tokens =
        ClientCredentials::new(http.clone(), &s.url("/oauth/token"), "client", "secret").unwrap();
    let client = ClientBuilder::new()
        .with_retry(retry())
        .with_auth(AuthLayer::oauth2(tokens))
        .build(http);
    let res = client
        .clone()
        .oneshot(to(&s.url("/orders"), order(1)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    // The server forgets every token it issued: the next call gets 401 once.
    s.revoke_tokens();
    let res = client
        .oneshot(to(&s.url("/orders"), order(2)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let st = s.stats();
    assert_eq!((st.tokens_issued, st.unauthorized), (2, 1));
    assert_eq!(st.orders_committed, 2);
}

#[tokio::test]
async fn a_token_that_expires_sooner_than_announced_is_replaced() {
    // Tokens announce an hour and expire after 300 ms; a 429 makes the call wait a second.
    let s = ChaosServer::start(Knobs {
        require_auth: true,
        token_lifetime: Duration::from_millis(300),
        token_expires_in: Some(serde_json::json!(3600)),
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Seconds(1),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let http = ReqwestService::new(reqwest::Client::new());
    let tokens =
        ClientCredentials::new(http.clone(), &s.url("/oauth/token"), "client", "secret").unwrap();
    let client = ClientBuilder::new()
        .with_retry(retry())
        .with_auth(AuthLayer::oauth2(tokens))
        .build(http);
    let res = client
        .oneshot(to(&s.url("/orders"), order(1)))
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
async fn a_body_cut_short_is_a_body_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf).await;
        // 100 bytes promised, 5 sent, then the connection closes.
        let _ = conn
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello")
            .await;
    });
    let res = ReqwestService::new(reqwest::Client::new())
        .oneshot(
            Request::get(format!("http://{addr}/"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let err = res.into_body().collect().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Body);
    assert_eq!(
        err.to_string(),
        "could not read the response body: the connection closed unexpectedly"
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn a_request_reqwest_cannot_build_is_a_config_error() {
    let err = ReqwestService::new(reqwest::Client::new())
        .oneshot(
            Request::get("/relative")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Config);
    assert_eq!(delivery(&err), Delivery::NotSent);
    assert!(err.to_string().starts_with("invalid request: "), "{err}");
}

#[tokio::test]
async fn too_many_redirects_is_reported_and_not_retried() {
    let base = serve(Router::new().route("/loop", get(|| async { Redirect::to("/loop") }))).await;
    let reqwest = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()
        .unwrap();
    let client = ClientBuilder::new()
        .with_retry(retry())
        .build(ReqwestService::new(reqwest));
    let err = client
        .oneshot(
            Request::get(format!("{base}/loop"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "could not follow a redirect: too many redirects"
    );
    let e = find::<sturdy_core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Other);
    assert_eq!(e.report().unwrap().attempts(), 1);
}

#[tokio::test]
async fn small_bodies_follow_307_redirects_and_the_final_url_is_kept() {
    let app = Router::new()
        .route("/old", post(|| async { Redirect::temporary("/new") }))
        .route("/new", post(|body: Bytes| async move { body }));
    let base = serve(app).await;
    let http = ReqwestService::new(reqwest::Client::new());

    // A body of known size is handed over as bytes: reqwest sends it again to /new.
    let res = http
        .clone()
        .oneshot(
            Request::post(format!("{base}/old"))
                .body(Full::new(Bytes::from_static(b"hello")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.extensions().get::<reqwest::Url>().unwrap().as_str(),
        format!("{base}/new")
    );
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");

    // A body of unknown size is streamed: reqwest cannot send it twice and returns the 307.
    let stream = StreamBody::new(futures_util::stream::iter([Ok::<_, Infallible>(
        http_body::Frame::data(Bytes::from_static(b"hello")),
    )]));
    let res = http
        .oneshot(Request::post(format!("{base}/old")).body(stream).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT);
}

#[test]
fn debug_never_shows_the_clients_default_headers() {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-api-key", "k3y-in-default-headers".parse().unwrap());
    headers.insert(
        http::header::AUTHORIZATION,
        "Bearer t0k3n-in-default-headers".parse().unwrap(),
    );
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let shown = format!("{:?}", ReqwestService::new(client));
    assert!(shown.starts_with("ReqwestService"), "{shown}");
    assert!(
        !shown.contains("k3y") && !shown.contains("t0k3n"),
        "{shown}"
    );
}

/// A resolver whose error text is 100 KB long (a connector or resolver that echoes whatever it
/// was given).
struct Verbose;

impl reqwest::dns::Resolve for Verbose {
    fn resolve(&self, _name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async { Err("no such host; ".repeat(7_000).into()) })
    }
}

#[tokio::test]
async fn a_cause_of_any_length_makes_a_short_message() {
    let client = reqwest::Client::builder()
        .dns_resolver(std::sync::Arc::new(Verbose))
        .build()
        .unwrap();
    let err = ReqwestService::new(client)
        .oneshot(
            Request::get("http://verbose.invalid/")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("no such host"), "{text}");
    assert!(text.len() < 1_024, "{} bytes", text.len());
    assert!(text.ends_with("..."), "{text}");
    // A connect error through reqwest may have been a redirect's target (see the crate docs).
    assert_eq!(classify_error(&err), ErrorKind::Connect, "{text}");
}
