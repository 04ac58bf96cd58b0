//! Every token error a caller receives is a `sturdy_core::Error` found by the documented
//! downcast on the top-level error, with its kind and an actionable message; configuration
//! errors are reported when the layer or source is built.

use crate::support;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy_auth::{AuthLayer, BoxFuture, ClientCredentials, Token, TokenSource};
use sturdy_core::{BoxError, Error, ErrorKind};
use support::{get, Api, TokenEndpoint, SECRET, TOKEN_URL};
use tower::{service_fn, Layer, ServiceBuilder, ServiceExt};

fn found(err: &BoxError) -> &Error {
    err.downcast_ref::<Error>()
        .unwrap_or_else(|| panic!("not found by downcast_ref::<sturdy_core::Error>(): {err:?}"))
}

/// Calls through the layer, and through one more layer on top, and checks the error.
async fn call_fails(source: ClientCredentials, kind: &ErrorKind, says: &str) {
    let api = Api::accept_all_tokens();
    let svc = ServiceBuilder::new()
        .map_err(|e: BoxError| e)
        .layer(AuthLayer::oauth2(source))
        .service(api.service());
    let err = svc.oneshot(get()).await.unwrap_err();
    let e = found(&err);
    assert_eq!(e.kind(), kind, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(says), "{msg}");
    assert!(!msg.contains(SECRET), "{msg}");
    assert!(
        api.calls.lock().unwrap().is_empty(),
        "no call without a token"
    );
}

#[tokio::test(start_paused = true)]
async fn token_endpoint_errors_are_sturdy_errors_through_the_layer() {
    let cases: [(u16, &str, ErrorKind, &str); 8] = [
        (
            429,
            r#"{"error":"slow_down"}"#,
            ErrorKind::RateLimited { retry_after: None },
            "slow_down",
        ),
        (
            401,
            r#"{"error":"invalid_client"}"#,
            ErrorKind::Auth,
            "client id or secret is wrong",
        ),
        (
            400,
            r#"{"error":"invalid_scope","error_description":"no admin"}"#,
            ErrorKind::Auth,
            "check the scopes [server says: no admin]",
        ),
        (
            400,
            r#"{"error":"unauthorized_client"}"#,
            ErrorKind::Auth,
            "enable it for the client",
        ),
        (
            500,
            r#"{"error":"server_error"}"#,
            ErrorKind::Server(http::StatusCode::INTERNAL_SERVER_ERROR),
            "server_error",
        ),
        (
            503,
            "busy",
            ErrorKind::Server(http::StatusCode::SERVICE_UNAVAILABLE),
            "503 Service Unavailable without an OAuth2 error",
        ),
        (
            429,
            "",
            ErrorKind::RateLimited { retry_after: None },
            "429 Too Many Requests",
        ),
        (200, "<html>", ErrorKind::Auth, "not a JSON object"),
    ];
    for (status, body, kind, says) in cases {
        let ep = TokenEndpoint::new(3_600);
        ep.fail_next(status, body);
        call_fails(ep.source(), &kind, says).await;
        // And from the source itself, for several callers of one failed request.
        let ep = TokenEndpoint::new(3_600);
        ep.fail_next(status, body);
        let source = ep.source();
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let s = source.clone();
                tokio::spawn(async move { s.token().await })
            })
            .collect();
        for w in waiters {
            let err = w.await.unwrap().unwrap_err();
            assert_eq!(found(&err).kind(), &kind);
            assert!(err.to_string().contains(says), "{err}");
        }
        assert_eq!(ep.count(), 1);
        // The repeated answer during the backoff, too.
        let err = source.token().await.unwrap_err();
        assert_eq!(found(&err).kind(), &kind);
        assert!(err.to_string().contains("is not asked again"), "{err}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_endpoint_keeps_its_cause_as_the_source() {
    let refused = service_fn(|_r: Request<Full<Bytes>>| async {
        Err::<Response<Full<Bytes>>, BoxError>(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )))
    });
    let source = ClientCredentials::new(refused, TOKEN_URL, "id", SECRET).unwrap();
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let s = source.clone();
            tokio::spawn(async move { s.token().await })
        })
        .collect();
    for w in waiters {
        let err = w.await.unwrap().unwrap_err();
        let e = found(&err);
        assert_eq!(e.kind(), &ErrorKind::Connect);
        assert!(e.is_retryable());
        assert_eq!(
            err.to_string(),
            "the token request to the token endpoint https://auth.example.com/oauth/token failed: connection refused"
        );
        // The shared cause is the source, and classification still sees the io error.
        let cause = std::error::Error::source(e).expect("a source");
        assert_eq!(cause.to_string(), "connection refused");
        assert_eq!(
            sturdy_core::classify::classify_error(&*err),
            ErrorKind::Connect
        );
    }
    let api = Api::accept_all_tokens();
    let err = AuthLayer::oauth2(
        ClientCredentials::new(
            service_fn(|_r: Request<Full<Bytes>>| async {
                Err::<Response<Full<Bytes>>, BoxError>("no route".into())
            }),
            TOKEN_URL,
            "id",
            SECRET,
        )
        .unwrap(),
    )
    .layer(api.service())
    .oneshot(get())
    .await
    .unwrap_err();
    assert_eq!(found(&err).kind(), &ErrorKind::Other);
}

/// A source that fails with its own error type.
#[derive(Debug)]
struct Vault;

impl TokenSource for Vault {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        Box::pin(async { Err::<Token, BoxError>("vault sealed".into()) })
    }
    fn invalidate(&self, _token: &Token) {}
    fn describe(&self) -> String {
        "the vault at /secret/api".to_owned()
    }
}

/// A source that fails with a sturdy error already.
#[derive(Debug)]
struct Sturdy;

impl TokenSource for Sturdy {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        Box::pin(async {
            Err::<Token, BoxError>(Box::new(Error::new(ErrorKind::Timeout, "sidecar slow")))
        })
    }
    fn invalidate(&self, _token: &Token) {}
}

#[tokio::test(start_paused = true)]
async fn custom_source_errors_are_wrapped_once() {
    let api = Api::accept_all_tokens();
    let err = AuthLayer::token_source(Arc::new(Vault))
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(found(&err).kind(), &ErrorKind::Auth);
    assert_eq!(
        err.to_string(),
        "could not get an access token from the vault at /secret/api: vault sealed"
    );
    let err = AuthLayer::token_source(Arc::new(Sturdy))
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(found(&err).kind(), &ErrorKind::Timeout);
    assert_eq!(err.to_string(), "sidecar slow");
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_token_wait_is_a_sturdy_error() {
    let ep = TokenEndpoint::new(60);
    ep.stall_next(1);
    let api = Api::accept_all_tokens();
    let err = AuthLayer::oauth2(ep.source())
        .with_token_timeout(Duration::from_millis(250))
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap_err();
    let e = found(&err);
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert!(err.to_string().starts_with(
        "no access token from the token endpoint https://auth.example.com/oauth/token within 250ms"
    ), "{err}");
}

#[test]
fn invalid_configuration_is_reported_when_built() {
    let client = service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    });
    let cc = |url: &str| ClientCredentials::new(client, url, "id", "secret");
    for bad in ["not a url", "/oauth/token", ""] {
        let err = cc(bad).unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config, "{bad}");
    }
    let ok = cc(TOKEN_URL).unwrap();
    for reserved in ["grant_type", "scope", "client_id", "client_secret", ""] {
        let err = ok.clone().with_param(reserved, "x").unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config, "{reserved}");
    }
    let ok = ok
        .with_param("resource", "https://api.example.com")
        .unwrap();
    assert!(format!("{ok:?}").contains("https://auth.example.com/oauth/token"));
    // Neither user info nor the query is shown: either may carry a secret.
    let hidden = cc("https://u:pw-123@auth.example.com:8443/t?key=k-456").unwrap();
    let shown = format!("{hidden:?} {}", hidden.describe());
    assert!(shown.contains("https://auth.example.com:8443/t"), "{shown}");
    assert!(
        !shown.contains("pw-123") && !shown.contains("k-456"),
        "{shown}"
    );

    assert_eq!(
        AuthLayer::api_key_query("", "k").unwrap_err().kind(),
        &ErrorKind::Config
    );
    assert_eq!(
        AuthLayer::bearer("a\nb").unwrap_err().kind(),
        &ErrorKind::Config
    );
    assert_eq!(
        AuthLayer::api_key(http::HeaderName::from_static("x-api-key"), "a\rb")
            .unwrap_err()
            .kind(),
        &ErrorKind::Config
    );
    assert_eq!(
        AuthLayer::basic("a:b", "p").unwrap_err().kind(),
        &ErrorKind::Config
    );
    // An empty credential (an unset variable) is refused when built, not sent as `Bearer `.
    let name = || http::HeaderName::from_static("x-api-key");
    for blank in ["", " ", "\t \t"] {
        for (err, what) in [
            (AuthLayer::bearer(blank).unwrap_err(), "the bearer token"),
            (
                AuthLayer::api_key(name(), blank).unwrap_err(),
                "the API key",
            ),
            (
                AuthLayer::api_key_query("api_key", blank).unwrap_err(),
                "the API key",
            ),
        ] {
            assert_eq!(err.kind(), &ErrorKind::Config);
            assert_eq!(
                err.to_string(),
                format!("{what} is empty (is the variable or file it comes from set?)")
            );
        }
    }
    // Basic with an empty password is an API key as the user name: allowed.
    assert!(AuthLayer::basic("sk_test_123", "").is_ok());
    // Every value of the infallible setters is accepted without a panic.
    let _ = cc(TOKEN_URL)
        .unwrap()
        .with_scopes(Vec::<String>::new())
        .with_audience("")
        .with_skew(Duration::MAX)
        .with_default_lifetime(Duration::ZERO)
        .with_max_lifetime(Duration::MAX)
        .with_request_timeout(Duration::ZERO);
    let _ = AuthLayer::bearer("t")
        .unwrap()
        .with_token_timeout(Duration::MAX)
        .with_replay_limit(0);
}

/// Hands out `tok-1`, then (once the API refused it) fails as if the token endpoint refused the
/// connection.
#[derive(Debug, Default)]
struct OneTokenThenRefused(std::sync::atomic::AtomicU32);

impl TokenSource for OneTokenThenRefused {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if n == 0 {
                Ok(Token::new("tok-1", None))
            } else {
                Err(Box::new(
                    Error::new(ErrorKind::Connect, "connection refused")
                        .with_delivery(sturdy_core::Delivery::NotSent),
                ) as BoxError)
            }
        })
    }

    fn invalidate(&self, _token: &Token) {}
}

#[tokio::test(start_paused = true)]
async fn a_token_failure_after_a_401_never_says_the_request_was_not_sent() {
    use sturdy_core::classify::{concerns_destination, delivery};
    use sturdy_core::Delivery;
    let api = Api::accept_all_tokens();
    api.accept_only(&["tok-2"]);
    let svc =
        AuthLayer::token_source(Arc::new(OneTokenThenRefused::default())).layer(api.service());
    let err = svc.oneshot(get()).await.unwrap_err();
    // The API answered the first attempt (401): it saw the request.
    assert_eq!(api.calls.lock().unwrap().len(), 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert!(
        !concerns_destination(&*err),
        "the token source's fault: {err}"
    );

    // Before any send, the same failure says not sent.
    let source = Arc::new(OneTokenThenRefused::default());
    source.0.store(1, std::sync::atomic::Ordering::SeqCst);
    let api = Api::accept_all_tokens();
    let err = AuthLayer::token_source(source)
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap_err();
    assert!(api.calls.lock().unwrap().is_empty());
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
}

/// Hands out a new token each time (`tok-1`, `tok-2`, ...).
#[derive(Debug, Default)]
struct FreshTokens(std::sync::atomic::AtomicU32);

impl TokenSource for FreshTokens {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        Box::pin(async move { Ok(Token::new(format!("tok-{n}"), None)) })
    }

    fn invalidate(&self, _token: &Token) {}
}

/// After a 401 the API has seen the request: a replay that then fails with an error that alone
/// would read "not sent" (a refused connection: the server closed the connection after its 401
/// and restarted) must not make the call read "not sent, safe to send again".
#[tokio::test(start_paused = true)]
async fn a_replay_that_fails_to_connect_after_a_401_never_says_not_sent() {
    use sturdy_core::classify::{classify_error, delivery};
    use sturdy_core::Delivery;
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = calls.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n == 0 {
                Ok(Response::builder().status(401).body(()).unwrap())
            } else {
                Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "connection refused",
                )) as BoxError)
            }
        }
    });
    // Alone, such an error reads as never sent.
    let alone: BoxError = Box::new(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "connection refused",
    ));
    assert_eq!(delivery(&*alone), Delivery::NotSent);
    let post = || {
        Request::post("http://api.example.com/orders")
            .body(Full::from("{}"))
            .unwrap()
    };
    let err = AuthLayer::token_source(Arc::new(FreshTokens::default()))
        .layer(api)
        .oneshot(post())
        .await
        .unwrap_err();
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    // The cause keeps its kind and words.
    assert_eq!(classify_error(&*err), ErrorKind::Connect, "{err}");
    assert!(err.to_string().contains("connection refused"), "{err}");
}

/// A source whose error's own text names no cause, as a hyper-util client's does.
#[derive(Debug)]
struct ThroughAClient;

#[derive(Debug)]
struct ClientWrapper(std::io::Error);

impl std::fmt::Display for ClientWrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("client error (Connect)")
    }
}

impl std::error::Error for ClientWrapper {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl TokenSource for ThroughAClient {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        Box::pin(async {
            Err::<Token, BoxError>(Box::new(ClientWrapper(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            ))))
        })
    }
    fn invalidate(&self, _: &Token) {}
    fn describe(&self) -> String {
        "the vault".to_owned()
    }
}

#[tokio::test]
async fn a_source_error_whose_text_names_no_cause_is_told_by_its_cause() {
    let api = Api::accept_all_tokens();
    let err = AuthLayer::token_source(Arc::new(ThroughAClient))
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap_err();
    let e = found(&err);
    assert_eq!(
        e.to_string(),
        "could not get an access token from the vault: connection refused"
    );
    assert!(sturdy_core::find::<ClientWrapper>(&*err).is_some());
}

/// A token endpoint reached through `client`: each request is counted; the first `broken` fail
/// with `fail()`, the rest answer a token.
fn flaky_endpoint(
    broken: u32,
    fail: fn() -> BoxError,
) -> (
    Arc<std::sync::atomic::AtomicU32>,
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = BoxError,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
) {
    use std::sync::atomic::{AtomicU32, Ordering};
    let count = Arc::new(AtomicU32::new(0));
    let seen = count.clone();
    let svc = service_fn(move |_r: Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < broken {
                return Err(fail());
            }
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(
                br#"{"access_token":"tok-ok","token_type":"Bearer","expires_in":3600}"#,
            ))))
        }
    });
    (count, svc)
}

fn reset() -> BoxError {
    Box::new(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "connection reset by peer",
    ))
}

#[tokio::test(start_paused = true)]
async fn a_token_request_whose_connection_broke_is_sent_once_more_at_once() {
    use std::sync::atomic::Ordering;
    // One broken connection: the second request, sent at once, brings the token; no backoff,
    // no error for the caller.
    let (count, endpoint) = flaky_endpoint(1, reset);
    let source = ClientCredentials::new(endpoint, TOKEN_URL, "id", SECRET).unwrap();
    let started = tokio::time::Instant::now();
    let token = source.token().await.unwrap();
    assert_eq!(
        sturdy_auth::ExposeSecret::expose_secret(token.secret()),
        "tok-ok"
    );
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "no backoff before the resend"
    );

    // Broken every time: sent twice, not more, then the usual error and backoff.
    let (count, endpoint) = flaky_endpoint(u32::MAX, reset);
    let source = ClientCredentials::new(endpoint, TOKEN_URL, "id", SECRET).unwrap();
    let err = source.token().await.unwrap_err();
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert_eq!(found(&err).kind(), &ErrorKind::Transport, "{err}");
    assert!(
        err.to_string().contains("connection reset by peer"),
        "{err}"
    );
    assert!(source.token().await.is_err());
    assert_eq!(
        count.load(Ordering::SeqCst),
        2,
        "backing off: not asked again"
    );

    // A refused connection (nothing was sent) and an error a sturdy layer of the token client
    // already judged are not sent again by the source.
    let (count, endpoint) = flaky_endpoint(1, || {
        Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ))
    });
    let source = ClientCredentials::new(endpoint, TOKEN_URL, "id", SECRET).unwrap();
    assert!(source.token().await.is_err());
    assert_eq!(count.load(Ordering::SeqCst), 1);
    let (count, endpoint) = flaky_endpoint(1, || {
        Box::new(
            Error::new(
                ErrorKind::Transport,
                "the retry layer gave up after 3 attempts",
            )
            .with_report(sturdy_core::CallReport::new(
                3,
                sturdy_core::Delivery::MaybeProcessed,
                None,
            )),
        )
    });
    let source = ClientCredentials::new(endpoint, TOKEN_URL, "id", SECRET).unwrap();
    assert!(source.token().await.is_err());
    assert_eq!(count.load(Ordering::SeqCst), 1);

    // A transport error a client converted to sturdy's (as sturdy-reqwest does), with no call
    // report: sent once more.
    let (count, endpoint) = flaky_endpoint(1, || {
        Box::new(
            Error::new(ErrorKind::Transport, "connection reset by peer").with_source(
                std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"),
            ),
        )
    });
    let source = ClientCredentials::new(endpoint, TOKEN_URL, "id", SECRET).unwrap();
    assert!(source.token().await.is_ok());
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_token_endpoints_text_is_quoted_with_its_control_characters_escaped() {
    let endpoint = service_fn(|_r: Request<Full<Bytes>>| async {
        let mut res = Response::new(Full::new(Bytes::from_static(
            br#"{"error":"invalid_client\u001b[31m","error_description":"bad client\r\n2026-12-07 INFO login ok \u001b[2J"}"#,
        )));
        *res.status_mut() = http::StatusCode::UNAUTHORIZED;
        Ok::<_, BoxError>(res)
    });
    let source = ClientCredentials::new(endpoint, TOKEN_URL, "id", SECRET).unwrap();
    let err = source.token().await.unwrap_err();
    let text = err.to_string();
    assert!(!text.chars().any(char::is_control), "{text:?}");
    assert!(
        text.contains(r"[server says: bad client\r\n2026-12-07 INFO login ok \u{1b}[2J]"),
        "{text}"
    );
    assert!(text.contains(r"invalid_client\u{1b}[31m"), "{text}");
}

/// A body that sends its first bytes, then breaks (the connection reset mid-body).
struct CutBody(bool);

impl http_body::Body for CutBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if self.0 {
            return std::task::Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset by peer",
            ))));
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
            br#"{"access_token":"#,
        )))))
    }
}

#[tokio::test(start_paused = true)]
async fn an_answer_whose_body_broke_off_is_not_sent_again() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let count = Arc::new(AtomicU32::new(0));
    let seen = count.clone();
    let endpoint = service_fn(move |_r: Request<Full<Bytes>>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(Response::new(CutBody(false))) }
    });
    let source = ClientCredentials::new(endpoint, TOKEN_URL, "id", SECRET).unwrap();
    let err = source.token().await.unwrap_err();
    assert_eq!(count.load(Ordering::SeqCst), 1, "{err}");
}
