//! docs/guides/auth.md and sturdy-auth's rustdoc, read literally: the token cache's refresh
//! point, lifetimes, backoff, client authentication, parameters, redaction of the token URL,
//! 401/403, custom sources, the zero token timeout, a runtime dropped mid-request, and an API
//! key in the query that no error or log line may show. Paused time, in-process endpoints.
#![cfg(feature = "full")]

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, ClientAuth, ClientCredentials, Token, TokenSource};
use sturdy::core::{BoxError, Delivery, ErrorKind};
use tower::{Service, ServiceBuilder, ServiceExt};

type Seen = Arc<Mutex<Vec<Request<Bytes>>>>;

/// A token endpoint answering `answer(n)` to its n-th request (from 1), recording each request.
fn endpoint(
    answer: impl Fn(usize) -> (u16, String) + Send + Sync + 'static,
) -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    Arc<AtomicUsize>,
    Seen,
) {
    let n = Arc::new(AtomicUsize::new(0));
    let seen: Seen = Arc::default();
    let answer = Arc::new(answer);
    let (n2, s2) = (n.clone(), seen.clone());
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        let (status, body) = answer(i);
        let s2 = s2.clone();
        async move {
            let (parts, body_in) = req.into_parts();
            let b = body_in.collect().await.unwrap().to_bytes();
            s2.lock().unwrap().push(Request::from_parts(parts, b));
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
        }
    });
    (svc, n, seen)
}

fn tok(i: usize, expires: &str) -> (u16, String) {
    let exp = if expires.is_empty() {
        String::new()
    } else {
        format!(r#","expires_in":{expires}"#)
    };
    (
        200,
        format!(r#"{{"access_token":"tok-{i}","token_type":"Bearer"{exp}}}"#),
    )
}

async fn value(c: &ClientCredentials) -> String {
    use sturdy::auth::ExposeSecret;
    c.get().await.unwrap().secret().expose_secret().to_owned()
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// "reused until `expiry - min(60 s, lifetime / 2)`, then refreshed in the background while
/// callers go on with the still-valid token": lifetime 100 s refreshes at 50 s, 1 h (missing
/// `expires_in`) at 59 min, a huge `expires_in` is 24 h.
#[tokio::test(start_paused = true)]
async fn refresh_points() {
    for (expires, refresh_at) in [
        ("100", 50u64),
        ("", 3_540),
        ("1e15", 86_340),
        ("\"7200\"", 7_140),
        ("1800.7", 1_740),
    ] {
        let (svc, n, _) = endpoint(move |i| tok(i, expires));
        let c = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "id", "secret").unwrap();
        assert_eq!(value(&c).await, "tok-1");
        tokio::time::advance(Duration::from_secs(refresh_at) - Duration::from_millis(500)).await;
        assert_eq!(value(&c).await, "tok-1", "expires_in {expires}");
        settle().await;
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "expires_in {expires}: refreshed too early"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        // Due: the still-valid token is returned at once, and the refresh runs behind it.
        assert_eq!(value(&c).await, "tok-1", "expires_in {expires}");
        settle().await;
        assert_eq!(
            n.load(Ordering::SeqCst),
            2,
            "expires_in {expires}: no refresh"
        );
        assert_eq!(value(&c).await, "tok-2");
    }
}

/// "`expires_in` ... zero or negative => a clear error".
#[tokio::test(start_paused = true)]
async fn zero_and_negative_lifetimes_are_clear_errors() {
    for expires in ["0", "-30", "\"-1\"", "0.4"] {
        let (svc, _, _) = endpoint(move |i| tok(i, expires));
        let c = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "id", "secret").unwrap();
        let e = c.get().await.unwrap_err();
        let m = e.to_string();
        assert!(m.contains("http://127.0.0.1:9/token"), "{m}");
        assert!(m.contains("expire"), "{m}");
        assert!(!m.contains("tok-1"), "the token shows in {m}");
    }
}

/// "a failed refresh ... backs off (1 s doubling to 60 s) instead of hammering the endpoint, and
/// a caller with no valid token during the backoff gets the last error at once".
#[tokio::test(start_paused = true)]
async fn backoff_doubles_and_fails_fast() {
    let (svc, n, _) = endpoint(|_| (503, r#"{"error":"temporarily_unavailable"}"#.to_owned()));
    let c = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "id", "secret").unwrap();
    let mut asked_at = vec![];
    let start = tokio::time::Instant::now();
    let mut last = 0;
    for _ in 0..(200 * 10) {
        let t0 = tokio::time::Instant::now();
        let e = c.get().await.unwrap_err();
        assert_eq!(
            tokio::time::Instant::now(),
            t0,
            "a caller during the backoff waited"
        );
        assert!(e.is_retryable(), "{e}");
        let now = n.load(Ordering::SeqCst);
        if now != last {
            asked_at.push((tokio::time::Instant::now() - start).as_millis() as u64);
            last = now;
        }
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    let gaps: Vec<u64> = asked_at.windows(2).map(|w| w[1] - w[0]).collect();
    // 1 s, 2 s, 4 s, ... at most 60 s (to the 100 ms step of this loop).
    let expect = [1_000u64, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000];
    for (g, e) in gaps.iter().zip(expect) {
        assert!(*g >= e && *g <= e + 100, "gaps {gaps:?}");
    }
    assert!(gaps.len() >= expect.len(), "gaps {gaps:?}");
}

/// "`.with_client_auth(ClientAuth::SecretPost)`": the id and secret in the body and no
/// `Authorization`; the default sends them as Basic; `with_scopes`, `with_audience` and
/// `with_param` add form parameters.
#[tokio::test]
async fn client_auth_and_params() {
    let (svc, _, seen) = endpoint(|i| tok(i, "3600"));
    let basic = ClientCredentials::new(svc.clone(), "http://127.0.0.1:9/token", "my id", "s&cret")
        .unwrap()
        .with_scopes(["a:read", "b:write"])
        .with_audience("https://api.test")
        .with_param("resource", "r 1")
        .unwrap();
    basic.get().await.unwrap();
    let post = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "my id", "s&cret")
        .unwrap()
        .with_client_auth(ClientAuth::SecretPost);
    post.get().await.unwrap();
    let seen = seen.lock().unwrap();
    let form = |r: &Request<Bytes>| -> Vec<(String, String)> {
        form_pairs(std::str::from_utf8(r.body()).unwrap())
    };
    let b = &seen[0];
    let auth = b.headers()["authorization"].to_str().unwrap();
    assert!(auth.starts_with("Basic "), "{auth}");
    let f = form(b);
    assert!(
        f.contains(&("grant_type".into(), "client_credentials".into())),
        "{f:?}"
    );
    assert!(
        f.contains(&("scope".into(), "a:read b:write".into())),
        "{f:?}"
    );
    assert!(
        f.contains(&("audience".into(), "https://api.test".into())),
        "{f:?}"
    );
    assert!(f.contains(&("resource".into(), "r 1".into())), "{f:?}");
    assert!(!f.iter().any(|(k, _)| k == "client_secret"), "{f:?}");
    let p = &seen[1];
    assert!(p.headers().get("authorization").is_none());
    let f = form(p);
    assert!(f.contains(&("client_id".into(), "my id".into())), "{f:?}");
    assert!(
        f.contains(&("client_secret".into(), "s&cret".into())),
        "{f:?}"
    );
}

fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    let b = s.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// "`.with_param(name, value)` (a `Result`: `grant_type`, `scope`, `client_id` and
/// `client_secret` are set by the source itself)"; the static constructors' `Config` errors.
#[test]
fn config_errors() {
    let (svc, _, _) = endpoint(|i| tok(i, "60"));
    let c = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "id", "secret").unwrap();
    for name in ["grant_type", "scope", "client_id", "client_secret", ""] {
        let e = c.clone().with_param(name, "v").unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Config, "{name}");
    }
    for e in [
        AuthLayer::bearer("a\nb").unwrap_err(),
        AuthLayer::api_key(http::HeaderName::from_static("x-api-key"), "a\rb").unwrap_err(),
        AuthLayer::api_key_query("", "k").unwrap_err(),
        AuthLayer::basic("a:b", "pw").unwrap_err(),
    ] {
        assert_eq!(e.kind(), &ErrorKind::Config, "{e}");
        assert!(!e.to_string().is_empty());
    }
    let (svc, _, _) = endpoint(|i| tok(i, "60"));
    for url in ["/token", "not a url", ""] {
        let e = ClientCredentials::new(svc.clone(), url, "id", "secret").unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Config, "{url}");
    }
}

/// "Messages name the token URL without its user info or query", and no `Debug` shows a secret.
#[tokio::test]
async fn token_url_credentials_never_shown() {
    let (svc, _, _) = endpoint(|_| {
        (
            401,
            r#"{"error":"invalid_client","error_description":"bad client"}"#.to_owned(),
        )
    });
    let c = ClientCredentials::new(
        svc,
        "http://alice:PASSWD-1@127.0.0.1:9/oauth/token?api_key=QUERYKEY-1",
        "id",
        "CLIENTSECRET-1",
    )
    .unwrap();
    let layer = AuthLayer::oauth2(c.clone());
    let e = c.get().await.unwrap_err();
    assert!(!e.is_retryable());
    let api = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let call_err = ServiceBuilder::new()
        .layer(layer.clone())
        .service(api)
        .oneshot(
            Request::get("http://api.test/x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let texts = [
        e.to_string(),
        format!("{e:?}"),
        format!("{c:?}"),
        format!("{layer:?}"),
        call_err.to_string(),
        format!("{call_err:?}"),
    ];
    for t in &texts {
        for secret in ["PASSWD-1", "QUERYKEY-1", "CLIENTSECRET-1", "alice"] {
            assert!(!t.contains(secret), "{secret} shows in {t}");
        }
    }
    assert!(
        texts[0].contains("http://127.0.0.1:9/oauth/token"),
        "{}",
        texts[0]
    );
    assert!(texts[0].contains("invalid_client"), "{}", texts[0]);
}

/// "401 from the API: the token is invalidated, a new one fetched, the request replayed once.
/// 403 is returned as is."
#[tokio::test]
async fn unauthorized_replays_once_forbidden_is_final() {
    for (api_status, token_requests, api_calls) in [(401u16, 2, 2), (403, 1, 1)] {
        let (svc, n, _) = endpoint(|i| tok(i, "3600"));
        let c = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "id", "secret").unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let k = calls.clone();
        let api = tower::service_fn(move |r: Request<Full<Bytes>>| {
            k.fetch_add(1, Ordering::SeqCst);
            let body_ok = r.headers()["authorization"].is_sensitive();
            async move {
                assert!(body_ok);
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(api_status)
                        .body(Full::<Bytes>::default())
                        .unwrap(),
                )
            }
        });
        let mut svc = ServiceBuilder::new()
            .layer(AuthLayer::oauth2(c))
            .concurrency_limit(1)
            .service(api);
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(
                Request::post("http://api.test/x")
                    .body(Full::from("b"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), api_status);
        assert_eq!(n.load(Ordering::SeqCst), token_requests, "{api_status}");
        assert_eq!(calls.load(Ordering::SeqCst), api_calls, "{api_status}");
    }
}

#[derive(Debug)]
struct Broken;
impl TokenSource for Broken {
    fn token(&self) -> sturdy::auth::BoxFuture<Result<Token, BoxError>> {
        Box::pin(async { Err::<Token, BoxError>("the vault is sealed".into()) })
    }
    fn invalidate(&self, _: &Token) {}
    fn describe(&self) -> String {
        "the vault".to_owned()
    }
}

/// "An error of your own `TokenSource` is wrapped in one (`could not get an access token from
/// <describe()>: ...`)"; "A call that failed for want of a token never reached the API: its error
/// says `Delivery::NotSent`".
#[tokio::test]
async fn custom_source_error_is_wrapped() {
    let api = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let err = ServiceBuilder::new()
        .layer(AuthLayer::token_source(Arc::new(Broken)))
        .service(api)
        .oneshot(
            Request::post("http://api.test/x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a sturdy_core::Error");
    let m = e.to_string();
    assert!(
        m.starts_with("could not get an access token from the vault"),
        "{m}"
    );
    assert!(
        m.contains("the vault is sealed"),
        "the cause is not named: {m}"
    );
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
}

/// "A cached token needs no wait, so `Duration::ZERO` means "the cached token or fail at once"",
/// with a `Timeout` error naming the token endpoint and saying the request was not sent.
#[tokio::test(start_paused = true)]
async fn zero_token_timeout() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let slow = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        n2.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                r#"{"access_token":"t","token_type":"Bearer","expires_in":3600}"#,
            ))))
        }
    });
    let c = ClientCredentials::new(slow, "https://auth.test/oauth/token", "id", "secret").unwrap();
    let layer = AuthLayer::oauth2(c).with_token_timeout(Duration::ZERO);
    assert_eq!(layer.token_timeout(), Duration::ZERO);
    let api = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let svc = ServiceBuilder::new().layer(layer).service(api);
    let t0 = tokio::time::Instant::now();
    let err = svc
        .clone()
        .oneshot(
            Request::post("http://api.test/x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(tokio::time::Instant::now(), t0);
    let e = err.downcast_ref::<sturdy::core::Error>().unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    let m = e.to_string();
    assert!(
        m.contains("no access token from the token endpoint https://auth.test/oauth/token"),
        "{m}"
    );
    assert!(m.contains("not sent"), "{m}");
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    // "The token request goes on, and later callers share it."
    tokio::time::sleep(Duration::from_millis(20)).await;
    let res = svc
        .oneshot(
            Request::post("http://api.test/x")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert!(res.is_ok(), "{res:?}");
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

/// "if that runtime shuts down mid-request, the next caller starts a new request".
#[test]
fn runtime_dropped_mid_request() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let ep = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            if i == 0 {
                std::future::pending::<()>().await;
            }
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                r#"{"access_token":"fresh","expires_in":3600}"#,
            ))))
        }
    });
    let c = ClientCredentials::new(ep, "http://127.0.0.1:9/token", "id", "secret").unwrap();
    let c1 = c.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(20), c1.get()).await;
        });
        drop(rt);
    })
    .join()
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let got = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), value(&c)).await });
    assert_eq!(
        got.expect("the token source is stuck after its runtime was dropped"),
        "fresh"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);
impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// "no `Debug` or log line shows them": an API key in the query, through `ClientBuilder` over a
/// real loopback server that answers 503 and then stalls past the attempt timeout, and over a
/// refused port; the final errors' `Display` and `Debug` and every `tracing` event at TRACE.
#[tokio::test]
async fn query_api_key_in_no_error_or_log() {
    let cap = Capture::default();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(cap.clone())
        .with_ansi(false)
        .finish();
    let _guard = crate::logs13_common::set_default(sub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        async move {
            if h.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response_()
            } else {
                tokio::time::sleep(Duration::from_millis(300)).await;
                (StatusCode::OK, "late").into_response_()
            }
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let secret = "QKEY-7f3a9c";
    let retry = sturdy::retry::RetryLayer::new()
        .with_backoff(
            sturdy::retry::Backoff::decorrelated_jitter(
                Duration::from_millis(2),
                Duration::from_millis(5),
            )
            .unwrap(),
        )
        .with_max_attempts(3);
    let client = sturdy::ClientBuilder::new()
        .with_retry(retry)
        .with_attempt_timeout(Duration::from_millis(50))
        .with_auth(AuthLayer::api_key_query("api_key", secret).unwrap())
        .build(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http(),
        );
    let mut texts = vec![];
    for target in [
        format!("http://{addr}/orders?x=1"),
        format!("http://{dead}/orders?x=1"),
    ] {
        match client
            .clone()
            .oneshot(Request::get(target).body(Full::default()).unwrap())
            .await
        {
            Ok(res) => texts.push(format!("{res:?}")),
            Err(err) => {
                texts.push(err.to_string());
                texts.push(format!("{err:?}"));
            }
        }
    }
    assert!(hits.load(Ordering::SeqCst) >= 2);
    let log = String::from_utf8_lossy(&cap.0.lock().unwrap()).into_owned();
    texts.push(log);
    for t in &texts {
        assert!(!t.contains(secret), "the API key shows in: {t}");
    }
}

trait IntoResp {
    fn into_response_(self) -> axum::response::Response;
}
impl IntoResp for (StatusCode, &'static str) {
    fn into_response_(self) -> axum::response::Response {
        axum::response::IntoResponse::into_response(self)
    }
}
