//! Auth's `tracing` events, errors and `Debug` against a local API and token endpoint: static
//! credentials, OAuth2 client credentials (tokens, 401 replays, refresh failures, a token
//! endpoint whose error echoes the request). auth.md: "no `Debug` or log line shows them".
#![cfg(feature = "full")]

use crate::logs13_common;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use bytes::Bytes;
use http::{HeaderName, Request, StatusCode};
use http_body_util::Full;
use logs13_common::{b64, clean, closed_port, whole, Capture};
use sturdy::auth::{AuthLayer, ClientAuth, ClientCredentials};
use sturdy::retry::{Backoff, RetryLayer};
use tower::{Layer, ServiceExt};

const CLIENT_SECRET: &str = "CliSecret13ww";
const ACCESS: &str = "AccessTok13vv";
const BEARER: &str = "Bearer13static";
const HEADER_KEY: &str = "HeaderKey13";
const QUERY_KEY: &str = "QueryKey13";
const PW: &str = "BasicPw13";

/// Every secret, and the base64 forms a Basic header gives them (without padding, so a prefix
/// is found inside a longer encoding too).
fn secrets() -> Vec<String> {
    let mut v: Vec<String> = [CLIENT_SECRET, ACCESS, BEARER, HEADER_KEY, QUERY_KEY, PW]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for pair in [format!("client:{CLIENT_SECRET}"), format!("user:{PW}")] {
        v.push(b64(pair.as_bytes()).trim_end_matches('=').to_owned());
    }
    v
}

fn check(what: &str, shown: &str) {
    let s = secrets();
    let refs: Vec<&str> = s.iter().map(String::as_str).collect();
    clean(what, shown, &refs);
}

fn quick() -> RetryLayer {
    RetryLayer::new().with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(1), Duration::from_millis(2)).unwrap(),
    )
}

fn hyper_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>()
}

#[derive(Clone, Default)]
struct Api {
    api_calls: Arc<AtomicUsize>,
}

fn echo(headers: &HeaderMap, body: &str) -> String {
    let authz = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    format!("request was [{body}] with [{authz}]")
}

async fn server() -> u16 {
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route(
            "/token/ok",
            post(|| async {
                format!(
                    "{{\"access_token\":\"{ACCESS}\",\"token_type\":\"Bearer\",\"expires_in\":3600}}"
                )
            }),
        )
        .route(
            "/token/echo",
            post(|headers: HeaderMap, body: String| async move {
                let d = serde_json::json!({"error": "invalid_client", "error_description": echo(&headers, &body)});
                (StatusCode::UNAUTHORIZED, d.to_string())
            }),
        )
        .route(
            "/token/echo-code",
            post(|headers: HeaderMap, body: String| async move {
                let d = serde_json::json!({"error": echo(&headers, &body)});
                (StatusCode::BAD_REQUEST, d.to_string())
            }),
        )
        .route(
            "/token/echo-500",
            post(|headers: HeaderMap, body: String| async move {
                (StatusCode::INTERNAL_SERVER_ERROR, echo(&headers, &body))
            }),
        )
        .route(
            "/api",
            get(|State(api): State<Api>| async move {
                // The first call is refused, so the token is refreshed and the call replayed.
                if api.api_calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    (
                        StatusCode::UNAUTHORIZED,
                        [("www-authenticate", "Bearer error=\"invalid_token\"")],
                        "no",
                    )
                } else {
                    (StatusCode::OK, [("x-ok", "1")], "yes")
                }
            }),
        )
        .route(
            "/api-echo",
            get(|headers: HeaderMap| async move {
                let authz = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                (
                    StatusCode::UNAUTHORIZED,
                    [(
                        "www-authenticate",
                        format!("Bearer error=\"invalid_token\", error_description=\"{authz} has expired\""),
                    )],
                    "no",
                )
            }),
        )
        .route(
            "/refused",
            get(|| async {
                (
                    StatusCode::UNAUTHORIZED,
                    [("www-authenticate", "Basic realm=\"api\"")],
                    "no",
                )
            }),
        )
        .with_state(Api::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

fn get(port: u16, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://127.0.0.1:{port}{path}"))
        .body(Full::<Bytes>::default())
        .unwrap()
}

/// The static layers: answered 401, refused connections, retried 503s.
#[tokio::test(flavor = "current_thread")]
async fn static_credentials_reach_no_event_error_or_debug() {
    let capture = Capture::default();
    let _guard = capture.install();
    let port = server().await;
    let closed = closed_port();
    let mut shown = Vec::new();
    let layers = [
        AuthLayer::bearer(BEARER).unwrap(),
        AuthLayer::api_key(HeaderName::from_static("x-api-key"), HEADER_KEY).unwrap(),
        AuthLayer::api_key_query("api_key", QUERY_KEY).unwrap(),
        AuthLayer::basic("user", PW).unwrap(),
    ];
    for layer in layers {
        shown.push(format!("{layer:?}"));
        let client = sturdy::ClientBuilder::new()
            .with_retry(quick())
            .with_auth(layer)
            .build(hyper_client());
        shown.push(format!("{client:?}"));
        let res = client.clone().oneshot(get(port, "/refused")).await.unwrap();
        shown.push(format!("{res:?}"));
        let e = client
            .clone()
            .oneshot(get(closed, "/refused"))
            .await
            .unwrap_err();
        shown.push(whole(&*e));
        let post = Request::post(format!("http://127.0.0.1:{closed}/orders"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let e = client.clone().oneshot(post).await.unwrap_err();
        shown.push(whole(&*e));
    }
    let logs = capture.text();
    assert!(!logs.is_empty(), "events were captured");
    check("logs", &logs);
    for s in &shown {
        check("static", s);
    }
}

/// Client credentials: a token, a 401 that refreshes it and replays the call, a token endpoint
/// that cannot be reached (with the secret sent in the body or in Basic), and `Debug` of the
/// source, its token, the layer and the client.
#[tokio::test(flavor = "current_thread")]
async fn client_credentials_reach_no_event_error_or_debug() {
    let capture = Capture::default();
    let _guard = capture.install();
    let port = server().await;
    let closed = closed_port();
    let mut shown = Vec::new();
    for auth in [ClientAuth::SecretBasic, ClientAuth::SecretPost] {
        let cc = ClientCredentials::new(
            hyper_client(),
            &format!("http://127.0.0.1:{port}/token/ok"),
            "client",
            CLIENT_SECRET,
        )
        .unwrap()
        .with_client_auth(auth);
        let token = cc.get().await.unwrap();
        shown.push(format!("{cc:?} {token:?}"));
        let layer = AuthLayer::oauth2(cc.clone());
        shown.push(format!("{layer:?}"));
        let svc = layer.clone().layer(hyper_client());
        shown.push(format!("{svc:?}"));
        let res = svc.oneshot(get(port, "/api")).await.unwrap();
        shown.push(format!("{res:?}"));
        let client = sturdy::ClientBuilder::new()
            .with_retry(quick())
            .with_auth(layer)
            .build(hyper_client());
        shown.push(format!("{client:?}"));
        let _ = client.clone().oneshot(get(port, "/api")).await;

        let down = ClientCredentials::new(
            hyper_client(),
            &format!("http://127.0.0.1:{closed}/token/ok"),
            "client",
            CLIENT_SECRET,
        )
        .unwrap()
        .with_client_auth(auth);
        let e = down.get().await.unwrap_err();
        shown.push(whole(&e));
        let client = sturdy::ClientBuilder::new()
            .with_retry(quick())
            .with_auth(AuthLayer::oauth2(down))
            .build(hyper_client());
        let e = client.clone().oneshot(get(port, "/api")).await.unwrap_err();
        shown.push(whole(&*e));
    }
    let logs = capture.text();
    assert!(logs.contains("401"), "the replay was logged: {logs}");
    check("logs", &logs);
    for s in &shown {
        check("oauth", s);
    }
}

/// A token endpoint whose error repeats the request it got (the form body with
/// `client_secret`, or the Basic header) in `error_description`.
#[tokio::test(flavor = "current_thread")]
async fn a_token_error_description_echoing_the_request_is_not_repeated() {
    let capture = Capture::default();
    let _guard = capture.install();
    let port = server().await;
    let mut shown = Vec::new();
    for auth in [ClientAuth::SecretBasic, ClientAuth::SecretPost] {
        let cc = ClientCredentials::new(
            hyper_client(),
            &format!("http://127.0.0.1:{port}/token/echo"),
            "client",
            CLIENT_SECRET,
        )
        .unwrap()
        .with_client_auth(auth);
        let e = cc.get().await.unwrap_err();
        shown.push(whole(&e));
    }
    let logs = capture.text();
    check("logs", &logs);
    for s in &shown {
        check("echo", s);
    }
}

/// The same, with the echo in the `error` code, or in a 500's plain body.
#[tokio::test(flavor = "current_thread")]
async fn a_token_error_code_or_body_echoing_the_request_is_not_repeated() {
    let capture = Capture::default();
    let _guard = capture.install();
    let port = server().await;
    let mut shown = Vec::new();
    for path in ["/token/echo-code", "/token/echo-500"] {
        for auth in [ClientAuth::SecretBasic, ClientAuth::SecretPost] {
            let cc = ClientCredentials::new(
                hyper_client(),
                &format!("http://127.0.0.1:{port}{path}"),
                "client",
                CLIENT_SECRET,
            )
            .unwrap()
            .with_client_auth(auth);
            let e = cc.get().await.unwrap_err();
            shown.push(whole(&e));
        }
    }
    let logs = capture.text();
    check("logs", &logs);
    for s in &shown {
        check("echo", s);
    }
}

/// A token URL with a password and a `client_secret` in its query, fetched through the
/// composed client (retries included): refused, and answered 500.
#[tokio::test(flavor = "current_thread")]
async fn a_token_urls_userinfo_and_query_reach_no_event_or_error() {
    let capture = Capture::default();
    let _guard = capture.install();
    let port = server().await;
    let closed = closed_port();
    let token_client = sturdy::ClientBuilder::new()
        .with_retry(quick())
        .build(hyper_client());
    let mut shown = Vec::new();
    for (p, path) in [(closed, "/token/ok"), (port, "/token/echo-500")] {
        let cc = ClientCredentials::new(
            token_client.clone(),
            &format!("http://id:{PW}@127.0.0.1:{p}{path}?client_secret={CLIENT_SECRET}&api_key={QUERY_KEY}"),
            "client",
            "other-secret",
        )
        .unwrap()
        .with_client_auth(ClientAuth::SecretPost);
        shown.push(format!("{cc:?}"));
        let e = cc.get().await.unwrap_err();
        shown.push(whole(&e));
        let client = sturdy::ClientBuilder::new()
            .with_retry(quick())
            .with_auth(AuthLayer::oauth2(cc))
            .build(hyper_client());
        let e = client.oneshot(get(port, "/api")).await.unwrap_err();
        shown.push(whole(&*e));
    }
    let logs = capture.text();
    assert!(logs.contains("token request failed"), "{logs}");
    check("logs", &logs);
    for s in &shown {
        check("token url", s);
    }
}

/// An API whose 401 challenge repeats the `Authorization` it got: the replay's INFO event
/// logs the challenge.
#[tokio::test(flavor = "current_thread")]
async fn a_challenge_echoing_the_access_token_is_not_logged() {
    let capture = Capture::default();
    let _guard = capture.install();
    let port = server().await;
    let cc = ClientCredentials::new(
        hyper_client(),
        &format!("http://127.0.0.1:{port}/token/ok"),
        "client",
        CLIENT_SECRET,
    )
    .unwrap();
    let svc = AuthLayer::oauth2(cc).layer(hyper_client());
    let res = svc.oneshot(get(port, "/api-echo")).await.unwrap();
    assert_eq!(res.status(), 401);
    let logs = capture.text();
    assert!(logs.contains("refreshing"), "{logs}");
    check("logs", &logs);
}
