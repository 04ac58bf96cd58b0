//! The OAuth2 source and the auth layer over real sockets (127.0.0.1, port 0, real time with
//! millisecond settings), per docs/guides/auth.md: a token endpoint that answers 10 MiB, stalls
//! before or after its head, refuses the connection, or answers through a hyper-util client with
//! Basic credentials; an API whose 401 is replayed with a fresh token.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sturdy::auth::{AuthLayer, ClientCredentials, ExposeSecret};
use sturdy::core::ErrorKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

use crate::s43_util::{base64, chain, get, SECRET};

fn http_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A raw server: to each connection it writes `reply` once the request head has come, then
/// holds the connection open for `hold`. Counts connections.
async fn raw_server(reply: Vec<u8>, hold: Duration) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let n = count.clone();
    let reply = Arc::new(reply);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            n.fetch_add(1, Ordering::SeqCst);
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                }
                let _ = sock.write_all(&reply).await;
                tokio::time::sleep(hold).await;
            });
        }
    });
    (format!("http://{addr}/oauth/token"), count)
}

fn src(url: &str) -> ClientCredentials {
    ClientCredentials::new(http_client(), url, "my-client", SECRET)
        .unwrap()
        .with_request_timeout(Duration::from_millis(300))
}

#[tokio::test]
async fn a_ten_mib_token_answer_is_cut_short_and_named() {
    let body = format!(
        r#"{{"access_token":"{}","token_type":"Bearer","expires_in":3600}}"#,
        "a".repeat(10 << 20)
    );
    let mut reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    reply.extend_from_slice(body.as_bytes());
    let (url, _) = raw_server(reply, Duration::from_secs(5)).await;
    let start = Instant::now();
    let err = src(&url).get().await.map(|_| ()).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3));
    let text = err.to_string();
    assert!(text.contains(&url), "{text}");
    assert!(text.len() < 2_000, "a {} byte message", text.len());
}

#[tokio::test]
async fn a_token_endpoint_silent_before_or_after_its_head_fails_at_the_request_timeout() {
    for reply in [
        Vec::new(),
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"access_token\":".to_vec(),
    ] {
        let (url, conns) = raw_server(reply.clone(), Duration::from_secs(30)).await;
        let source = src(&url);
        let start = Instant::now();
        let err = source.get().await.map(|_| ()).unwrap_err();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(2_000),
            "{took:?}"
        );
        assert_eq!(*err.kind(), ErrorKind::Timeout, "{err}");
        assert!(err.is_retryable());
        assert!(err.to_string().contains(&url), "{err}");
        // During the backoff the last error comes at once, without a new connection.
        let start = Instant::now();
        assert!(source.get().await.is_err());
        assert!(start.elapsed() < Duration::from_millis(100));
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn a_refused_connection_is_a_retryable_connect_error_naming_the_endpoint() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/oauth/token", listener.local_addr().unwrap());
    drop(listener);
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(src(&url)))
        .service(http_client());
    let err = svc.oneshot(get("http://127.0.0.1:9/x")).await.unwrap_err();
    let e = crate::s43_util::own(&err);
    assert_eq!(*e.kind(), ErrorKind::Connect, "{}", chain(&*err));
    assert!(e.is_retryable());
    assert!(err.to_string().contains(&url), "{err}");
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    assert_eq!(e.delivery(), Some(sturdy::core::Delivery::NotSent));
}

#[tokio::test]
async fn over_hyper_a_401_is_replayed_with_a_fresh_token_sent_with_basic_credentials() {
    use axum::extract::State;
    use axum::http::HeaderMap;
    use axum::routing::{get as aget, post as apost};
    #[derive(Clone, Default)]
    struct S {
        tokens: Arc<AtomicUsize>,
        api: Arc<std::sync::Mutex<Vec<String>>>,
        basic: Arc<std::sync::Mutex<Vec<String>>>,
    }
    let state = S::default();
    let app = axum::Router::new()
        .route(
            "/oauth/token",
            apost(|State(s): State<S>, h: HeaderMap| async move {
                let n = s.tokens.fetch_add(1, Ordering::SeqCst) + 1;
                s.basic.lock().unwrap().push(
                    h.get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default(),
                );
                format!(
                    r#"{{"access_token":"wire-{n}","token_type":"bearer","expires_in":"3600"}}"#
                )
            }),
        )
        .route(
            "/v1/orders",
            aget(|State(s): State<S>, h: HeaderMap| async move {
                let a = h["authorization"].to_str().unwrap().to_owned();
                s.api.lock().unwrap().push(a.clone());
                if a == "Bearer wire-1" {
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::OK
                }
            }),
        )
        .with_state(state.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let source = src(&format!("http://{addr}/oauth/token"));
    let mut svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(source.clone()))
        .concurrency_limit(1)
        .service(http_client());
    for _ in 0..3 {
        let res = tower::Service::call(
            svc.ready().await.unwrap(),
            get(&format!("http://{addr}/v1/orders")),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(
        *state.api.lock().unwrap(),
        [
            "Bearer wire-1",
            "Bearer wire-2",
            "Bearer wire-2",
            "Bearer wire-2"
        ]
    );
    assert_eq!(state.tokens.load(Ordering::SeqCst), 2);
    let basic = format!("Basic {}", base64(format!("my-client:{SECRET}").as_bytes()));
    assert!(state.basic.lock().unwrap().iter().all(|b| *b == basic));
    assert_eq!(
        source.get().await.unwrap().secret().expose_secret(),
        "wire-2"
    );
}

#[tokio::test]
async fn through_a_reqwest_token_client_the_message_keeps_the_urls_userinfo_and_query_out() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://robot:pa55@{addr}/oauth/token?api_key=qs3cret");
    let token_client = sturdy::reqwest::ReqwestService::new(reqwest::Client::new());
    let source = ClientCredentials::new(token_client, &url, "my-client", SECRET)
        .unwrap()
        .with_request_timeout(Duration::from_secs(5));
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(source))
        .service(http_client());
    let err = svc.oneshot(get("http://127.0.0.1:9/x")).await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&format!("http://{addr}/oauth/token")),
        "{message}"
    );
    for needle in ["pa55", "qs3cret"] {
        assert!(!message.contains(needle), "{message}");
    }
    let text = chain(&*err);
    for needle in ["pa55", "qs3cret"] {
        assert!(
            !text.contains(needle),
            "the error chain shows {needle}: {text}"
        );
    }
}
