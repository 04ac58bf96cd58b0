//! Auth against the chaos server's OAuth2 endpoint, over loopback in real time; and no secret in
//! any Debug output or tracing event.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy_auth::{AuthLayer, ClientAuth, ClientCredentials, ExposeSecret};
use sturdy_chaos::{http_client, ChaosServer, Knobs};
use sturdy_core::{BoxError, ErrorKind};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceBuilder, ServiceExt};

const SECRET: &str = "chaos-secret-5f2e9";

async fn server(lifetime: Duration) -> ChaosServer {
    ChaosServer::start(Knobs {
        require_auth: true,
        client_secret: SECRET.into(),
        token_lifetime: lifetime,
        ..Knobs::default()
    })
    .await
    .unwrap()
}

fn get(s: &ChaosServer) -> Request<Full<Bytes>> {
    Request::get(s.url("/orders"))
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn a_revoked_token_costs_one_401_and_one_refresh() {
    let s = server(Duration::from_secs(3_600)).await;
    let cc =
        ClientCredentials::new(http_client(), &s.url("/oauth/token"), "client", SECRET).unwrap();
    let client = AuthLayer::oauth2(cc).layer(http_client());
    for _ in 0..5 {
        assert_eq!(
            client.clone().oneshot(get(&s)).await.unwrap().status(),
            StatusCode::OK
        );
    }
    assert_eq!(s.stats().token_requests, 1);
    s.revoke_tokens();
    assert_eq!(
        client.clone().oneshot(get(&s)).await.unwrap().status(),
        StatusCode::OK
    );
    let st = s.stats();
    assert_eq!(
        (st.unauthorized, st.token_requests, st.tokens_issued),
        (1, 2, 2)
    );
}

#[tokio::test]
async fn expiry_on_the_server_clock_is_met_by_a_refresh() {
    // 2 s tokens: the skew is capped at half (1 s), so the client refreshes before the server
    // would refuse the token.
    let s = server(Duration::from_secs(2)).await;
    let cc = ClientCredentials::new(http_client(), &s.url("/oauth/token"), "client", SECRET)
        .unwrap()
        .with_client_auth(ClientAuth::SecretPost);
    let client = AuthLayer::oauth2(cc).layer(http_client());
    assert_eq!(
        client.clone().oneshot(get(&s)).await.unwrap().status(),
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // Due: this call goes with the still-valid token while the refresh runs in the background.
    assert_eq!(
        client.clone().oneshot(get(&s)).await.unwrap().status(),
        StatusCode::OK
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while s.stats().tokens_issued < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the background refresh ends");
    assert_eq!(
        client.clone().oneshot(get(&s)).await.unwrap().status(),
        StatusCode::OK
    );
    let st = s.stats();
    assert_eq!((st.token_requests, st.unauthorized), (2, 0));
}

#[tokio::test]
async fn a_wrong_secret_is_a_clear_error() {
    let s = server(Duration::from_secs(60)).await;
    let cc =
        ClientCredentials::new(http_client(), &s.url("/oauth/token"), "client", "wrong").unwrap();
    let client = AuthLayer::oauth2(cc).layer(http_client());
    let err = client.oneshot(get(&s)).await.unwrap_err();
    assert!(err.to_string().contains("invalid_client"), "{err}");
    assert!(err.to_string().contains("check them"), "{err}");
    assert_eq!(s.stats().api_requests, 0, "no call without a token");
}

#[tokio::test]
async fn malformed_token_responses_from_the_wire() {
    let s = server(Duration::from_secs(60)).await;
    for (status, body, want) in [
        (200, "<html>hello</html>", "not a JSON object"),
        (200, r#"{"token_type":"Bearer"}"#, "no access_token"),
        (
            200,
            r#"{"access_token":"x","token_type":"Bearer","expires_in":0}"#,
            "already expired",
        ),
        (503, "busy", "503 Service Unavailable"),
    ] {
        s.update(|k| k.token_response = Some((status, body.into())));
        let cc = ClientCredentials::new(http_client(), &s.url("/oauth/token"), "client", SECRET)
            .unwrap();
        let err = cc.get().await.unwrap_err();
        assert!(err.to_string().contains(want), "{body}: {err}");
    }
}

/// A loopback listener that accepts connections and never answers; it keeps them open.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/oauth/token", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, task)
}

#[tokio::test]
async fn a_black_holed_token_endpoint_cannot_hold_a_call() {
    let (url, hole) = black_hole().await;
    let s = server(Duration::from_secs(60)).await;

    // The layer's token timeout ends the call; the message names the endpoint.
    let cc = ClientCredentials::new(http_client(), &url, "client", SECRET)
        .unwrap()
        .with_request_timeout(Duration::from_millis(400));
    let client = AuthLayer::oauth2(cc.clone())
        .with_token_timeout(Duration::from_millis(100))
        .layer(http_client());
    let started = tokio::time::Instant::now();
    let err = client.clone().oneshot(get(&s)).await.unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
    assert!(waited < Duration::from_millis(350), "{waited:?}");
    let e = err
        .downcast_ref::<sturdy_core::Error>()
        .expect("a sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert!(err.to_string().contains(&url), "{err}");
    assert!(!err.to_string().contains(SECRET));

    // The token request itself ends by its own timeout, with an error that says so.
    let started = tokio::time::Instant::now();
    let err = cc.get().await.unwrap_err();
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(600), "{waited:?}");
    assert_eq!(err.kind(), &ErrorKind::Timeout);
    assert!(
        err.to_string().contains("did not answer within 400ms"),
        "{err}"
    );
    assert_eq!(s.stats().api_requests, 0);
    hole.abort();
}

#[tokio::test]
async fn a_composed_sync_client_requests_the_tokens() {
    let s = server(Duration::from_secs(3_600)).await;
    // A token client with its own layers, boxed as the facade boxes its client.
    let token_client: BoxCloneSyncService<
        Request<Full<Bytes>>,
        Response<hyper::body::Incoming>,
        BoxError,
    > = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .timeout(Duration::from_secs(5))
            .service(http_client()),
    );
    let cc =
        ClientCredentials::new(token_client, &s.url("/oauth/token"), "client", SECRET).unwrap();
    let token = cc.get().await.unwrap();
    assert!(!token.secret().expose_secret().is_empty());
    let client = AuthLayer::oauth2(cc).layer(http_client());
    assert_eq!(
        client.oneshot(get(&s)).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(s.stats().token_requests, 1);
}

/// Collects everything tracing writes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn no_secret_in_debug_or_tracing() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    // A second subscriber registered for the whole process: while only one is, tracing-core
    // asks the default subscriber of whichever thread reaches a call site first, and a test
    // thread without one would mark the call site "never" for this test too.
    static KEPT: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    KEPT.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    let _guard = tracing::subscriber::set_default(subscriber);

    let s = server(Duration::from_secs(3_600)).await;
    let cc =
        ClientCredentials::new(http_client(), &s.url("/oauth/token"), "client", SECRET).unwrap();
    let token = cc.get().await.unwrap();
    let token_value = token.secret().expose_secret().to_owned();
    let layer = AuthLayer::oauth2(cc.clone());
    let client = layer.layer(http_client());
    // Exercise the paths that log: a 401 and refresh, a failing token endpoint, a bad secret.
    s.revoke_tokens();
    client.clone().oneshot(get(&s)).await.unwrap();
    s.update(|k| k.token_fail_next = 1);
    let current = cc.get().await.unwrap();
    sturdy_auth::TokenSource::invalidate(&cc, &current);
    let _ = cc.get().await;
    let bad = ClientCredentials::new(
        http_client(),
        &s.url("/oauth/token"),
        "client",
        "wrong-secret-77",
    )
    .unwrap();
    let _ = bad.get().await;

    let debug = format!(
        "{cc:?} {layer:?} {client:?} {token:?} {:?} {:?} {:?}",
        AuthLayer::bearer("bearer-secret-1").unwrap(),
        AuthLayer::api_key(http::HeaderName::from_static("x-api-key"), "api-secret-2").unwrap(),
        AuthLayer::basic("u", "basic-secret-3").unwrap(),
    );
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("401"), "the refresh was logged: {logs}");
    for secret in [
        SECRET,
        token_value.as_str(),
        "wrong-secret-77",
        "bearer-secret-1",
        "api-secret-2",
        "basic-secret-3",
    ] {
        assert!(!debug.contains(secret), "Debug shows {secret}: {debug}");
        assert!(!logs.contains(secret), "tracing shows {secret}");
    }
    let _ = std::io::stdout().flush();
}

/// A token endpoint on a real socket that closes its first connection after reading the
/// request, without an answer (as a server that closed an idle pooled connection leaves the
/// next request): the source sends the request once more, on a new connection, and the caller
/// gets its token without an error or a backoff.
#[tokio::test]
async fn a_token_request_cut_by_its_connection_is_sent_again_on_a_new_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(Mutex::new(0u32));
    let seen = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let n = {
                let mut c = seen.lock().unwrap();
                *c += 1;
                *c
            };
            tokio::spawn(async move {
                // Reads the head and the small form body.
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                }
                if n == 1 {
                    return; // closed without an answer
                }
                let body = r#"{"access_token":"tok-wire","token_type":"Bearer","expires_in":3600}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    let cc = ClientCredentials::new(
        http_client(),
        &format!("http://{addr}/oauth/token"),
        "client",
        SECRET,
    )
    .unwrap();
    let token = tokio::time::timeout(Duration::from_secs(5), cc.get())
        .await
        .expect("within 5 s")
        .unwrap();
    assert_eq!(token.secret().expose_secret(), "tok-wire");
    assert_eq!(*connections.lock().unwrap(), 2);
}
