//! Outside tests of sturdy-auth against docs/guides/auth.md and the crate docs: the token cache,
//! hostile token responses, 401 replay, bounded waits, words.
use crate::outsider_common;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use outsider_common::*;
use sturdy::auth::{AuthLayer, ClientAuth, ClientCredentials, ExposeSecret};
use sturdy::core::{find, BoxError, ErrorKind};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

const TOKEN_URL: &str = "https://auth.example.com/oauth/token";

#[derive(Clone)]
struct TokenEndpoint {
    script: Arc<Mutex<VecDeque<(u16, String, Duration)>>>,
    fallback: Arc<Mutex<(u16, String, Duration)>>,
    hits: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>,
}

impl TokenEndpoint {
    fn new(fallback: (u16, &str)) -> Self {
        Self {
            script: Arc::default(),
            fallback: Arc::new(Mutex::new((
                fallback.0,
                fallback.1.to_owned(),
                Duration::ZERO,
            ))),
            hits: Arc::default(),
            bodies: Arc::default(),
        }
    }
    fn token(n: usize, expires: &str) -> String {
        format!(r#"{{"access_token":"t-{n}","token_type":"Bearer","expires_in":{expires}}}"#)
    }
    fn push(&self, status: u16, body: impl Into<String>, delay: Duration) {
        self.script
            .lock()
            .unwrap()
            .push_back((status, body.into(), delay));
    }
    fn set(&self, status: u16, body: impl Into<String>, delay: Duration) {
        *self.fallback.lock().unwrap() = (status, body.into(), delay);
    }
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    fn service(
        &self,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let me = self.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let me = me.clone();
            async move {
                me.hits.fetch_add(1, Ordering::SeqCst);
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                me.bodies.lock().unwrap().push((parts.headers, body));
                let next = me.script.lock().unwrap().pop_front();
                let (status, body, delay) =
                    next.unwrap_or_else(|| me.fallback.lock().unwrap().clone());
                if delay == Duration::MAX {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(delay).await;
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::from(body))
                        .unwrap(),
                )
            }
        })
    }
    fn source(&self) -> ClientCredentials {
        ClientCredentials::new(self.service(), TOKEN_URL, "my-client", "my-secret").unwrap()
    }
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

fn bearer_of(s: &Seen) -> String {
    s.headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn one_token_request_for_fifty_callers() {
    let ep = TokenEndpoint::new((200, &TokenEndpoint::token(1, "3600")));
    ep.set(
        200,
        TokenEndpoint::token(1, "3600"),
        Duration::from_millis(100),
    );
    let api = Api::new(vec![], ok());
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(tokio::spawn(
            svc.clone().oneshot(get("http://api.example.com/")),
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(ep.hits(), 1);
    assert!(api.seen().iter().all(|s| bearer_of(s) == "Bearer t-1"));
}

#[tokio::test(start_paused = true)]
async fn refresh_happens_in_the_background_before_expiry() {
    let ep = TokenEndpoint::new((200, ""));
    ep.push(200, TokenEndpoint::token(1, "3600"), Duration::ZERO);
    ep.set(200, TokenEndpoint::token(2, "3600"), Duration::from_secs(5));
    let api = Api::new(vec![], ok());
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    svc.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(3_541)).await;
    let start = Instant::now();
    svc.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "a caller waited although a valid token existed"
    );
    assert_eq!(bearer_of(&api.seen()[1]), "Bearer t-1");
    settle().await;
    eprintln!("hits after the due call: {}", ep.hits());
    tokio::time::advance(Duration::from_secs(6)).await;
    settle().await;
    eprintln!("hits 6 s later: {}", ep.hits());
    svc.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    eprintln!("hits after the third call: {}", ep.hits());
    tokio::time::advance(Duration::from_secs(6)).await;
    settle().await;
    svc.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    eprintln!(
        "seen: {:?}",
        api.seen().iter().map(bearer_of).collect::<Vec<_>>()
    );
    assert_eq!(bearer_of(&api.seen()[2]), "Bearer t-2");
    assert_eq!(ep.hits(), 2);
}

#[tokio::test(start_paused = true)]
async fn expires_in_values() {
    // (value, Some(lifetime) when accepted, None when refused)
    let cases: &[(&str, Option<u64>)] = &[
        ("null", Some(3_600)),
        ("0", None),
        ("-5", None),
        ("\"abc\"", None),
        ("1e30", Some(86_400)),
        ("18446744073709551615", Some(86_400)),
        ("99999999999999999999999999999", Some(86_400)),
        ("1.7976931348623157e308", Some(86_400)),
        ("3600.9", Some(3_600)),
        ("[]", None),
        ("{}", None),
    ];
    for (value, expect) in cases {
        let ep = TokenEndpoint::new((200, ""));
        let body = if *value == "null" {
            r#"{"access_token":"t-1","token_type":"Bearer"}"#.to_owned()
        } else {
            TokenEndpoint::token(1, value)
        };
        ep.set(200, body, Duration::ZERO);
        let src = ep.source();
        let got = src.get().await;
        match (expect, got) {
            (None, Err(e)) => {
                eprintln!("expires_in {value}: {e}");
                assert_eq!(ep.hits(), 1);
            }
            (Some(secs), Ok(tok)) => {
                let left = tok.expires_at().expect("an expiry") - Instant::now();
                assert!(
                    left <= Duration::from_secs(*secs)
                        && left + Duration::from_secs(1) >= Duration::from_secs(*secs),
                    "expires_in {value}: lifetime {left:?}, expected {secs}s"
                );
            }
            (e, g) => panic!(
                "expires_in {value}: expected {e:?}, got {:?}",
                g.map(|t| t.expires_at())
            ),
        }
    }
}

/// Many providers (Azure AD v1, some Keycloak adapters, older Salesforce) send `expires_in` as a
/// JSON string of digits. The guide: "zero, negative or not a number: an error".
#[tokio::test(start_paused = true)]
async fn expires_in_as_a_string_of_digits() {
    let ep = TokenEndpoint::new((200, ""));
    ep.set(200, TokenEndpoint::token(1, "\"3599\""), Duration::ZERO);
    let got = ep.source().get().await;
    eprintln!(
        "expires_in \"3599\": {:?}",
        got.as_ref()
            .map(|t| t.expires_at())
            .map_err(|e| e.to_string())
    );
}

#[tokio::test(start_paused = true)]
async fn a_token_response_larger_than_64_kib_is_refused() {
    let ep = TokenEndpoint::new((200, ""));
    let pad = "x".repeat(70 * 1024);
    ep.set(
        200,
        format!(r#"{{"access_token":"t-1","pad":"{pad}","expires_in":3600}}"#),
        Duration::ZERO,
    );
    let err = ep.source().get().await.unwrap_err();
    eprintln!("huge body: {err}");
    assert!(!err.to_string().contains(&pad[..100]));
}

#[tokio::test(start_paused = true)]
async fn an_endless_token_body_is_cut() {
    use futures_util_shim::endless_body;
    let endpoint = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(Response::new(endless_body()))
    });
    let src = ClientCredentials::new(endpoint, TOKEN_URL, "c", "s").unwrap();
    let r = tokio::time::timeout(Duration::from_secs(60), src.get()).await;
    let err = r.expect("an endless token body must be cut").unwrap_err();
    eprintln!("endless body: {err}");
}

mod futures_util_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::{Body, Frame};

    /// A body that never ends: 1 KiB chunks forever.
    pub(crate) struct Endless;
    impl Body for Endless {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[b' '; 1024])))))
        }
    }
    pub(crate) fn endless_body() -> Endless {
        Endless
    }
}

#[tokio::test(start_paused = true)]
async fn hostile_access_tokens_do_not_panic_or_inject_headers() {
    for tok in [
        "abc\\r\\nX-Evil: 1",
        "",
        "\\u0000",
        "tok with spaces",
        "\\u00e9t\\u00e9",
    ] {
        let ep = TokenEndpoint::new((200, ""));
        ep.set(
            200,
            format!(r#"{{"access_token":"{tok}","token_type":"Bearer","expires_in":3600}}"#),
            Duration::ZERO,
        );
        let api = Api::new(vec![], ok());
        let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
        let r = svc.oneshot(get("http://api.example.com/")).await;
        match r {
            Ok(_) => {
                let seen = api.seen();
                assert!(!seen[0].headers.contains_key("x-evil"));
                eprintln!(
                    "token {tok:?} accepted: {:?}",
                    seen[0].headers.get("authorization")
                );
            }
            Err(e) => {
                eprintln!("token {tok:?}: {e}");
                assert_eq!(api.calls(), 0);
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn token_endpoint_errors_say_what_to_fix() {
    let cases: &[(u16, &str, bool)] = &[
        (401, r#"{"error":"invalid_client"}"#, false),
        (
            400,
            r#"{"error":"invalid_scope","error_description":"unknown scope"}"#,
            false,
        ),
        (503, "Service Unavailable", true),
        (429, "", true),
        (408, "", true),
        (200, "<html>login</html>", false),
        (200, r#"{"token_type":"Bearer"}"#, false),
    ];
    for (status, body, retryable) in cases {
        let ep = TokenEndpoint::new((*status, body));
        let err = ep.source().get().await.unwrap_err();
        eprintln!("{status} {body}: {err} (kind {:?})", err.kind());
        assert_eq!(err.is_retryable(), *retryable, "{status} {body}: {err}");
        if !err.to_string().contains("auth.example.com") {
            eprintln!("  (does not name the token endpoint)");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn failed_refresh_keeps_the_valid_token_and_backs_off() {
    let ep = TokenEndpoint::new((200, ""));
    ep.push(200, TokenEndpoint::token(1, "600"), Duration::ZERO);
    ep.set(500, "boom", Duration::ZERO);
    let api = Api::new(vec![], ok());
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    svc.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    // From 540 s the token is due; call every 100 ms until 599 s.
    tokio::time::advance(Duration::from_secs(540)).await;
    let until = Instant::now() + Duration::from_secs(59);
    while Instant::now() < until {
        let r = svc.clone().oneshot(get("http://api.example.com/")).await;
        assert!(
            r.is_ok(),
            "a valid token existed: {:?}",
            r.err().map(|e| e.to_string())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hits = ep.hits();
    // 1 s, 2, 4, 8, 16, 32: about 7 refresh attempts in 59 s, not 590.
    assert!(hits <= 9, "{hits} token requests");
    // After expiry: no valid token, within a backoff: the last error at once.
    tokio::time::advance(Duration::from_secs(2)).await;
    let start = Instant::now();
    let err = svc
        .clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap_err();
    eprintln!("after expiry: {err}");
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_401_refreshes_once_and_replays_once() {
    let ep = TokenEndpoint::new((200, ""));
    ep.push(200, TokenEndpoint::token(1, "3600"), Duration::ZERO);
    ep.set(200, TokenEndpoint::token(2, "3600"), Duration::ZERO);
    let api = Api::new(vec![status(401)], ok());
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    let res = svc
        .clone()
        .oneshot(post("http://api.example.com/orders", "{\"x\":1}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(bearer_of(&seen[0]), "Bearer t-1");
    assert_eq!(bearer_of(&seen[1]), "Bearer t-2");
    assert_eq!(&seen[1].body[..], b"{\"x\":1}");
    // Twice 401: the second is returned as is.
    api.set_fallback(status(401));
    let res = svc
        .clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(api.calls(), 4);
    // 403: returned as is, no refresh.
    let hits = ep.hits();
    api.set_fallback(status(403));
    let res = svc
        .clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(api.calls(), 5);
    assert_eq!(ep.hits(), hits);
}

#[tokio::test(start_paused = true)]
async fn a_401_storm_does_not_hammer_the_token_endpoint() {
    // The API answers 401 to everything (a revoked client): 20 concurrent callers.
    let ep = TokenEndpoint::new((200, ""));
    ep.set(
        200,
        TokenEndpoint::token(1, "3600"),
        Duration::from_millis(10),
    );
    let api = Api::new(vec![], status(401));
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    for _ in 0..5 {
        let mut tasks = Vec::new();
        for _ in 0..20 {
            tasks.push(tokio::spawn(
                svc.clone().oneshot(get("http://api.example.com/")),
            ));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().status(), 401);
        }
    }
    eprintln!("token requests for 100 calls answered 401: {}", ep.hits());
    assert!(
        ep.hits() <= 20,
        "{} token requests for 100 calls",
        ep.hits()
    );
}

#[tokio::test(start_paused = true)]
async fn token_wait_is_bounded_and_names_the_endpoint() {
    let ep = TokenEndpoint::new((200, ""));
    ep.set(200, TokenEndpoint::token(1, "3600"), Duration::MAX);
    let api = Api::new(vec![], ok());
    let svc = AuthLayer::oauth2(ep.source())
        .with_token_timeout(Duration::from_secs(5))
        .layer(api.service());
    let start = Instant::now();
    let err = svc
        .clone()
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    let e = find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    let msg = err.to_string();
    eprintln!("token wait: {msg}");
    assert!(msg.contains(TOKEN_URL) && msg.contains("not sent"), "{msg}");
    assert_eq!(api.calls(), 0);
}

/// The token-wait timeout says "the request was not sent" in its message, and `Delivery::NotSent`
/// is documented for "no token": `classify::delivery` and `ErrorSummary` must agree (they said
/// `MaybeProcessed` once, so an agent was told the request "may already have been processed").
#[tokio::test(start_paused = true)]
async fn token_wait_timeout_is_not_sent() {
    let ep = TokenEndpoint::new((200, ""));
    ep.set(200, TokenEndpoint::token(1, "3600"), Duration::MAX);
    let api = Api::new(vec![], ok());
    let svc = AuthLayer::oauth2(ep.source())
        .with_token_timeout(Duration::from_secs(5))
        .layer(api.service());
    let err = svc
        .clone()
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 0);
    let summary = sturdy::core::ErrorSummary::of(&*err);
    eprintln!("summary: {summary:?}\nadvice: {}", summary.advice());
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent,
        "{err}"
    );
}

/// The same through the composed client: a POST whose every attempt found no token was never
/// sent, so the final error must not say it "may have been processed".
#[tokio::test(start_paused = true)]
async fn composed_post_without_token_is_not_sent() {
    let ep = TokenEndpoint::new((200, ""));
    ep.set(200, TokenEndpoint::token(1, "3600"), Duration::MAX);
    let api = Api::new(vec![], ok());
    let client = sturdy::ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(1))
        .with_auth(AuthLayer::oauth2(ep.source()).with_token_timeout(Duration::from_secs(2)))
        .build(api.service());
    let err = client
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 0);
    let msg = err.to_string();
    eprintln!("composed: {msg}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent,
        "{msg}"
    );
    assert!(!msg.contains("may have been processed"), "{msg}");
}

#[tokio::test(start_paused = true)]
async fn token_request_timeout_ends_the_single_flight() {
    let ep = TokenEndpoint::new((200, ""));
    ep.push(200, TokenEndpoint::token(1, "3600"), Duration::MAX);
    ep.set(200, TokenEndpoint::token(2, "3600"), Duration::ZERO);
    let src = ep.source().with_request_timeout(Duration::from_secs(10));
    let start = Instant::now();
    let err = src.get().await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert_eq!(err.kind(), &ErrorKind::Timeout);
    eprintln!("request timeout: {err}");
    // Backs off 1 s, then works.
    tokio::time::advance(Duration::from_secs(2)).await;
    let tok = src.get().await.unwrap();
    assert_eq!(tok.secret().expose_secret(), "t-2");
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_does_not_cancel_the_token_request() {
    let ep = TokenEndpoint::new((200, ""));
    ep.set(200, TokenEndpoint::token(1, "3600"), Duration::from_secs(2));
    let src = ep.source();
    let r = tokio::time::timeout(Duration::from_secs(1), src.get()).await;
    assert!(r.is_err());
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    let start = Instant::now();
    let tok = src.clone().get().await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(tok.secret().expose_secret(), "t-1");
    assert_eq!(ep.hits(), 1);
}

#[tokio::test(start_paused = true)]
async fn static_credentials_validation_and_debug() {
    assert!(AuthLayer::bearer("a\nb").is_err());
    assert!(AuthLayer::basic("us:er", "pw").is_err());
    assert!(AuthLayer::api_key_query("", "k").is_err());
    let e = AuthLayer::bearer("a\r\nb").unwrap_err();
    assert!(
        !e.to_string().contains("a\r\nb"),
        "the secret is echoed in the error: {e}"
    );
    let l = AuthLayer::basic("user", "pa55word").unwrap();
    assert!(!format!("{l:?}").contains("pa55word"));
    let ep = TokenEndpoint::new((200, ""));
    let src = ep.source();
    assert!(!format!("{src:?}").contains("my-secret"));
    assert!(src.clone().with_param("grant_type", "x").is_err());
    assert!(src.clone().with_param("client_secret", "x").is_err());
    assert!(src.clone().with_param("", "x").is_err());
    assert!(src.with_param("resource", "x").is_ok());
}

#[tokio::test(start_paused = true)]
async fn api_key_query_is_added_and_not_duplicated() {
    let api = Api::new(vec![], ok());
    let svc = AuthLayer::api_key_query("api_key", "k1")
        .unwrap()
        .layer(api.service());
    svc.clone()
        .oneshot(get("http://api.example.com/x?a=1"))
        .await
        .unwrap();
    svc.clone()
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap();
    svc.clone()
        .oneshot(get("http://api.example.com/x?api_key=mine&b=2"))
        .await
        .unwrap();
    let seen = api.seen();
    eprintln!(
        "{:?}",
        seen.iter().map(|s| s.uri.clone()).collect::<Vec<_>>()
    );
    assert_eq!(seen[0].uri, "http://api.example.com/x?a=1&api_key=k1");
    assert_eq!(seen[1].uri, "http://api.example.com/x?api_key=k1");
    assert_eq!(
        seen[2].uri.matches("api_key=").count(),
        1,
        "{}",
        seen[2].uri
    );
}

#[tokio::test(start_paused = true)]
async fn token_url_secrets_never_in_messages() {
    let ep = TokenEndpoint::new((401, r#"{"error":"invalid_client"}"#));
    let src = ClientCredentials::new(
        ep.service(),
        "https://user:hunter2@auth.example.com/oauth/token?key=topsecret",
        "c",
        "s",
    )
    .unwrap();
    let err = src.get().await.unwrap_err();
    let s = format!("{err} {err:?} {src:?}");
    assert!(!s.contains("hunter2") && !s.contains("topsecret"), "{s}");
}

#[tokio::test(start_paused = true)]
async fn secret_post_and_basic_are_sent_as_documented() {
    let ep = TokenEndpoint::new((200, &TokenEndpoint::token(1, "3600")));
    ep.source().get().await.unwrap();
    let (h, b) = ep.bodies.lock().unwrap()[0].clone();
    let b = String::from_utf8(b.to_vec()).unwrap();
    assert!(h
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("Basic "));
    assert!(
        b.contains("grant_type=client_credentials") && !b.contains("my-secret"),
        "{b}"
    );
    let ep = TokenEndpoint::new((200, &TokenEndpoint::token(1, "3600")));
    ep.source()
        .with_client_auth(ClientAuth::SecretPost)
        .get()
        .await
        .unwrap();
    let (h, b) = ep.bodies.lock().unwrap()[0].clone();
    let b = String::from_utf8(b.to_vec()).unwrap();
    assert!(!h.contains_key("authorization"));
    assert!(
        b.contains("client_secret=my-secret") && b.contains("client_id=my-client"),
        "{b}"
    );
}

/// The token endpoint fails (503); the API request was never sent, so the error is `NotSent`,
/// not classified as if the API itself had answered 503.
#[tokio::test(start_paused = true)]
async fn token_endpoint_failure_is_not_sent() {
    let ep = TokenEndpoint::new((503, "down"));
    let api = Api::new(vec![], ok());
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    let err = svc
        .clone()
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 0);
    let summary = sturdy::core::ErrorSummary::of(&*err);
    eprintln!("token 503: {err}\n  summary: {summary:?}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent,
        "{err}"
    );
}

/// A failing token endpoint (another host) must not open the API host's breaker: the API was
/// never called. The circuit guide: failures "say something about the dependency's health".
#[tokio::test(start_paused = true)]
async fn token_endpoint_failures_do_not_open_the_api_breaker() {
    let ep = TokenEndpoint::new((503, "down"));
    let api = Api::new(vec![], ok());
    let (breaker, handle) = sturdy::circuit::CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let client = sturdy::ClientBuilder::new()
        .without_retry()
        .with_circuit_breaker(breaker)
        .with_auth(AuthLayer::oauth2(ep.source()))
        .build(api.service());
    for _ in 0..5 {
        let _ = client
            .clone()
            .oneshot(get("http://api.example.com/x"))
            .await;
        tokio::time::advance(Duration::from_secs(61)).await;
    }
    eprintln!(
        "API breaker after 5 token-endpoint 503s: {:?}",
        handle.state("api.example.com")
    );
    assert_eq!(
        handle.state("api.example.com"),
        Some(sturdy::circuit::CircuitState::Closed),
        "the API host's breaker opened although the API was never called"
    );
}

/// `ClientBuilder` docs: "the wait for a token is bounded by the attempt timeout too, so a token
/// endpoint that never answers cannot hold a call past it", and "A request can set its own
/// [attempt timeout] with CallOptions": a request's own, shorter attempt timeout bounds the token
/// wait as well (the call waits its 1 s, not the builder's 2 s).
#[tokio::test(start_paused = true)]
async fn a_per_request_attempt_timeout_bounds_the_token_wait() {
    let ep = TokenEndpoint::new((200, ""));
    ep.set(200, TokenEndpoint::token(1, "3600"), Duration::MAX);
    let api = Api::new(vec![], ok());
    let client = sturdy::ClientBuilder::new()
        .without_retry()
        .with_attempt_timeout(Duration::from_secs(2))
        .with_auth(AuthLayer::oauth2(ep.source()))
        .build(api.service());
    let start = Instant::now();
    let err = client
        .clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2), "{err}");
    eprintln!("builder token wait: {err}");
    let mut r = get("http://api.example.com/");
    r.extensions_mut()
        .insert(sturdy::core::CallOptions::new().with_attempt_timeout(Duration::from_secs(1)));
    let start = Instant::now();
    let _ = client.clone().oneshot(r).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}
