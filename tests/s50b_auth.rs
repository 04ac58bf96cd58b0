//! Round s50b, `sturdy-auth` from the outside (docs/guides/auth.md and the crate docs): a token
//! request whose caller is dropped, whose runtime is dropped, or whose runtime stops driving it;
//! hostile token responses and the secrets an error may echo; the layer under `Buffer`,
//! `ConcurrencyLimit(1)` and `Timeout`, kept and cloned; inside `ClientBuilder` with a 401 then
//! a 503; the replay limit read to the byte; static credentials that cannot be sent.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, ClientAuth, ClientCredentials, ExposeSecret, Token, TokenSource};
use sturdy::core::{BoxError, Error, ErrorKind};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::s43_util::Logs;

const URL: &str = "https://auth.example.com/oauth/token";
const ID: &str = "client-s50b";
const SECRET: &str = "CS-s50b+sec/ret=x y%";

/// How the token endpoint answers request `n` (0-based): status, body, and a delay (`None`:
/// never).
type Script = Arc<dyn Fn(usize) -> (u16, String, Option<Duration>) + Send + Sync>;

struct Ep {
    count: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<String>>>,
}

fn source(
    script: impl Fn(usize) -> (u16, String, Option<Duration>) + Send + Sync + 'static,
) -> (ClientCredentials, Ep) {
    source_at(URL, script)
}

fn source_at(
    url: &str,
    script: impl Fn(usize) -> (u16, String, Option<Duration>) + Send + Sync + 'static,
) -> (ClientCredentials, Ep) {
    let script: Script = Arc::new(script);
    let count = Arc::new(AtomicUsize::new(0));
    let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
    let (c, b) = (count.clone(), bodies.clone());
    let client = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        let script = script.clone();
        let b = b.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            b.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            let (status, text, delay) = script(n);
            match delay {
                None => std::future::pending::<()>().await,
                Some(d) if !d.is_zero() => tokio::time::sleep(d).await,
                Some(_) => {}
            }
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::<Bytes>::from(text))
                    .unwrap(),
            )
        }
    });
    let src = ClientCredentials::new(client, url, ID, SECRET).unwrap();
    (src, Ep { count, bodies })
}

fn token(v: &str, expires: &str) -> String {
    format!(r#"{{"access_token":"{v}","token_type":"Bearer","expires_in":{expires}}}"#)
}

fn value(t: &Token) -> String {
    t.secret().expose_secret().to_owned()
}

fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{err} / {err:?}");
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(&format!(" <- {e} / {e:?}"));
        cur = e.source();
    }
    out
}

/// The secret as sent in every form the guide lists: raw, form-encoded, Basic credentials.
fn secret_forms() -> Vec<String> {
    let form: String = SECRET
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                (b as char).to_string()
            }
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let basic_plain = format!("{ID}:{form}");
    vec![
        SECRET.to_owned(),
        form,
        crate::s43_util::base64(basic_plain.as_bytes()),
    ]
}

// ---------------------------------------------------------------------------------------------
// Cancellation

/// "a caller that gives up does not cancel it for the others": the first caller is dropped
/// while the endpoint takes 2 s; the next caller gets that very token, with one request.
#[tokio::test(start_paused = true)]
async fn a_dropped_caller_does_not_cancel_the_token_request() {
    let (src, ep) = source(|n| {
        (
            200,
            token(&format!("t-{n}"), "3600"),
            Some(Duration::from_secs(2)),
        )
    });
    let dropped = tokio::time::timeout(Duration::from_millis(500), src.get()).await;
    assert!(dropped.is_err());
    assert_eq!(ep.count.load(Ordering::SeqCst), 1);
    let t = src.get().await.unwrap();
    assert_eq!(value(&t), "t-0");
    assert_eq!(ep.count.load(Ordering::SeqCst), 1);
}

/// "if that runtime shuts down mid-request, the next caller starts a new request": runtime A
/// starts the request and is dropped; a caller on another runtime gets a token at once.
#[test]
fn a_runtime_dropped_mid_request_does_not_break_the_source() {
    let (src, ep) = source(|n| {
        if n == 0 {
            (200, token("never", "3600"), None)
        } else {
            (200, token(&format!("t-{n}"), "3600"), Some(Duration::ZERO))
        }
    });
    let a = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = src.clone();
    a.block_on(async move {
        let r = tokio::time::timeout(Duration::from_millis(20), s.get()).await;
        assert!(r.is_err());
    });
    assert_eq!(ep.count.load(Ordering::SeqCst), 1);
    drop(a);
    let b = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = b
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), src.get()).await })
        .expect("the next caller waited on a request lost with its runtime")
        .unwrap();
    assert_eq!(value(&t), "t-1");
    assert_eq!(ep.count.load(Ordering::SeqCst), 2);
}

/// The same with a multi-thread runtime A shut down in the background while callers on runtime
/// B wait for its request: they move to a new one.
#[test]
fn callers_waiting_on_another_runtimes_request_survive_its_shutdown() {
    let (src, ep) = source(|n| {
        if n == 0 {
            (200, token("never", "3600"), None)
        } else {
            (
                200,
                token(&format!("t-{n}"), "3600"),
                Some(Duration::from_millis(5)),
            )
        }
    });
    let a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let s = src.clone();
    let started = a.spawn(async move { s.get().await });
    while ep.count.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    let b = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = b.block_on(async {
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let s = src.clone();
                tokio::spawn(async move { s.get().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.shutdown_background();
        let mut out = Vec::new();
        for w in waiters {
            out.push(
                tokio::time::timeout(Duration::from_secs(5), w)
                    .await
                    .expect("a waiter hung after the other runtime shut down")
                    .unwrap(),
            );
        }
        out
    });
    drop(started);
    for r in got {
        assert_eq!(value(&r.unwrap()), "t-1");
    }
    assert_eq!(ep.count.load(Ordering::SeqCst), 2);
}

/// "if it stops driving the request without shutting down (blocked, no longer polled), the
/// request is given up 10 s after its request timeout": runtime A is kept but never driven
/// again; a caller on runtime B gets a token from a new request, within timeout + 10 s.
#[test]
fn a_request_on_a_runtime_no_longer_driven_is_given_up() {
    let (src, ep) = source(|n| (200, token(&format!("t-{n}"), "3600"), Some(Duration::ZERO)));
    let src = src.with_request_timeout(Duration::from_millis(100));
    let a = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let b = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let s = src.clone();
    // Start the request on A, and stop driving A before the request's task runs.
    a.block_on(async move {
        use futures_util::FutureExt;
        assert!(s.get().now_or_never().is_none());
    });
    let before = ep.count.load(Ordering::SeqCst);
    let t = b.block_on(async {
        let start = tokio::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(60), src.get()).await;
        (r, start.elapsed())
    });
    let (r, waited) = t;
    let tok = r.expect("the caller waited past timeout + 10 s").unwrap();
    assert!(value(&tok).starts_with("t-"));
    assert!(waited <= Duration::from_millis(10_200), "{waited:?}");
    assert!(ep.count.load(Ordering::SeqCst) >= before);
    drop(a);
}

// ---------------------------------------------------------------------------------------------
// Hostile token responses

/// `expires_in` zero or negative is a clear error; absent is 1 h; huge is 24 h; the token is in
/// no message.
#[tokio::test(start_paused = true)]
async fn hostile_expires_in() {
    for bad in ["0", "-1", "-99999999999999999999", "-1e400", "-0"] {
        let (src, _) = source(move |_| (200, token("TOK-s50b-zero", bad), Some(Duration::ZERO)));
        let err = src.get().await.unwrap_err();
        let text = chain(&err);
        assert!(!text.contains("TOK-s50b-zero"), "{bad}: {text}");
        assert!(text.contains("expire"), "{bad}: not a clear error: {text}");
    }
    for (expires, life) in [
        ("1e400", 24 * 3600),
        ("99999999999999999999", 24 * 3600),
        ("86401", 24 * 3600),
        ("7200", 7200),
    ] {
        let (src, _) = source(move |_| (200, token("t", expires), Some(Duration::ZERO)));
        let now = tokio::time::Instant::now();
        let t = src.get().await.unwrap();
        assert_eq!(
            t.expires_at(),
            Some(now + Duration::from_secs(life)),
            "{expires}"
        );
    }
    let (src, _) = source(|_| {
        (
            200,
            r#"{"access_token":"t","token_type":"bearer"}"#.into(),
            Some(Duration::ZERO),
        )
    });
    let now = tokio::time::Instant::now();
    assert_eq!(
        src.get().await.unwrap().expires_at(),
        Some(now + Duration::from_secs(3600))
    );
}

/// Bodies that are not a token: each is an error, no panic, and neither the token nor the
/// secret appears in it, even when the server echoes them.
#[tokio::test(start_paused = true)]
async fn hostile_token_bodies_leak_nothing() {
    let huge = format!(
        "{{\"access_token\":\"TOK-s50b{}\"}}",
        "A".repeat(8 * 1024 * 1024)
    );
    let forms = secret_forms();
    let echo = forms.join(" | ");
    let bodies: Vec<(u16, String)> = vec![
        (200, "not json".into()),
        (200, "".into()),
        (200, huge),
        (
            200,
            r#"{"access_token":"TOK-s50b\u0001x","token_type":"Bearer"}"#.into(),
        ),
        (
            200,
            r#"{"access_token":"TOK-s50b\nx","token_type":"Bearer"}"#.into(),
        ),
        (200, r#"{"token_type":"Bearer"}"#.into()),
        (200, r#"[1,2,3]"#.into()),
        (
            400,
            format!(r#"{{"error":"invalid_request","error_description":"bad secret {echo}"}}"#),
        ),
        (
            401,
            format!(r#"{{"error":"{}","error_description":"{echo}"}}"#, forms[0]),
        ),
        (500, format!("<html>{echo}</html>")),
        (200, format!("not json {echo}")),
    ];
    for (status, body) in bodies {
        let b = body.clone();
        let (src, _) = source(move |_| (status, b.clone(), Some(Duration::ZERO)));
        let r = src.get().await;
        let err = match r {
            Ok(t) => {
                assert!(
                    !value(&t).is_empty(),
                    "an empty access_token was handed out"
                );
                panic!("{status} {body:.60}: a token was handed out");
            }
            Err(e) => e,
        };
        let text = chain(&err);
        assert!(text.len() < 4096, "{} bytes of error", text.len());
        assert!(!text.contains("TOK-s50b"), "{text}");
        for f in &forms {
            assert!(!text.contains(f.as_str()), "secret form {f:?} in {text}");
        }
    }
}

/// A token endpoint that never answers: the wait ends at the request timeout (kind `Timeout`,
/// retryable), then the backoff answers at once with that error.
#[tokio::test(start_paused = true)]
async fn a_stalling_token_endpoint_times_out_and_backs_off() {
    let (src, ep) = source(|n| {
        if n == 0 {
            (200, token("late", "3600"), None)
        } else {
            (200, token("t-1", "3600"), Some(Duration::ZERO))
        }
    });
    let src = src.with_request_timeout(Duration::from_secs(2));
    let start = tokio::time::Instant::now();
    let err = src.get().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Timeout, "{err}");
    assert!(err.is_retryable());
    assert!(start.elapsed() >= Duration::from_secs(2));
    assert!(
        start.elapsed() < Duration::from_millis(2_100),
        "{:?}",
        start.elapsed()
    );
    let at = start.elapsed();
    let err2 = src.get().await.unwrap_err();
    assert_eq!(start.elapsed(), at, "the backoff answers at once");
    assert_eq!(err2.kind(), &ErrorKind::Timeout);
    assert_eq!(ep.count.load(Ordering::SeqCst), 1);
    tokio::time::advance(Duration::from_millis(1_001)).await;
    assert_eq!(value(&src.get().await.unwrap()), "t-1");
}

/// No tracing event at TRACE shows the secret or a token, through a fetch, a refusal and a
/// 401-replay through the layer.
#[tokio::test(start_paused = true)]
async fn tracing_at_trace_shows_no_secret() {
    let logs = Logs::default();
    let _g = logs.capture();
    let (src, _) = source(|n| match n {
        0 => (
            400,
            r#"{"error":"invalid_scope"}"#.into(),
            Some(Duration::ZERO),
        ),
        n => (
            200,
            token(&format!("TOK-s50b-{n}"), "3600"),
            Some(Duration::ZERO),
        ),
    });
    assert!(src.get().await.is_err());
    tokio::time::advance(Duration::from_secs(2)).await;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let api = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let n = h.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(if n == 0 { 401 } else { 200 })
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let svc = AuthLayer::oauth2(src.clone()).layer(api);
    let res = svc
        .oneshot(
            Request::post("https://api.example.com/x")
                .body(Full::from("hi"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = logs.text();
    assert!(!text.contains("TOK-s50b"), "{text}");
    for f in secret_forms() {
        assert!(!text.contains(&f), "{f} in {text}");
    }
    assert!(!format!("{src:?}").contains("CS-s50b"));
}

// ---------------------------------------------------------------------------------------------
// Composition

fn api_counting(
    statuses: Vec<u16>,
) -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = BoxError,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Arc<Mutex<Vec<(String, Bytes)>>>,
) {
    let seen: Arc<Mutex<Vec<(String, Bytes)>>> = Arc::default();
    let s = seen.clone();
    let statuses = Arc::new(statuses);
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let s = s.clone();
        let statuses = statuses.clone();
        async move {
            let auth = req
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let n = {
                let mut g = s.lock().unwrap();
                g.push((auth, body));
                g.len() - 1
            };
            let st = *statuses.get(n).unwrap_or(&200);
            Ok::<_, BoxError>(
                Response::builder()
                    .status(st)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    (svc, seen)
}

/// Auth over `Buffer` over `ConcurrencyLimit(1)`, under a `Timeout` shorter than the token
/// fetch, driven by 8 clones: the first callers time out, the token request goes on, and later
/// callers share its token (one request) and all get through.
#[tokio::test(start_paused = true)]
async fn auth_over_buffer_and_limit_under_timeout() {
    let (src, ep) = source(|n| {
        (
            200,
            token(&format!("t-{n}"), "3600"),
            Some(Duration::from_secs(3)),
        )
    });
    let (api, seen) = api_counting(vec![]);
    let svc = ServiceBuilder::new()
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(1)))
        .layer(AuthLayer::oauth2(src))
        .buffer(4)
        .concurrency_limit(1)
        .service(api);
    let mut early = Vec::new();
    for _ in 0..8 {
        let svc = svc.clone();
        early.push(tokio::spawn(async move {
            svc.oneshot(
                Request::get("https://api.example.com/o")
                    .body(Full::default())
                    .unwrap(),
            )
            .await
        }));
    }
    for e in early {
        assert!(e.await.unwrap().is_err());
    }
    tokio::time::advance(Duration::from_secs(3)).await;
    let mut later = Vec::new();
    for _ in 0..8 {
        let mut svc = svc.clone();
        later.push(tokio::spawn(async move {
            let req = Request::get("https://api.example.com/o")
                .body(Full::default())
                .unwrap();
            svc.ready().await?.call(req).await
        }));
    }
    for l in later {
        assert_eq!(l.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(ep.count.load(Ordering::SeqCst), 1);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 8);
    assert!(seen.iter().all(|(a, _)| a == "Bearer t-0"));
}

/// `ConcurrencyLimit(1)` over Auth with a kept service: a call waiting for a token holds the
/// permit; when its future is dropped, the permit goes with it and the next call proceeds.
#[tokio::test(start_paused = true)]
async fn a_dropped_waiting_call_releases_the_permit() {
    let (src, ep) = source(|n| {
        (
            200,
            token(&format!("t-{n}"), "3600"),
            Some(Duration::from_secs(5)),
        )
    });
    let (api, seen) = api_counting(vec![]);
    let mut svc = ServiceBuilder::new()
        .concurrency_limit(1)
        .layer(AuthLayer::oauth2(src))
        .service(api);
    let req = || {
        Request::get("https://api.example.com/o")
            .body(Full::default())
            .unwrap()
    };
    let fut = svc.ready().await.unwrap().call(req());
    tokio::time::timeout(Duration::from_secs(1), fut)
        .await
        .unwrap_err();
    // The permit is free again: readiness is immediate.
    tokio::time::timeout(Duration::from_millis(1), svc.ready())
        .await
        .expect("the dropped call kept the permit")
        .unwrap();
    let res = svc.call(req()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(ep.count.load(Ordering::SeqCst), 1);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// In `ClientBuilder` with retries: a POST answered 401 (new token, replay), then 503 (the
/// retry layer's retry), then 200. Every attempt carries the whole body; two tokens.
#[tokio::test(start_paused = true)]
async fn client_builder_401_then_503_then_200() {
    let (src, ep) = source(|n| (200, token(&format!("t-{n}"), "3600"), Some(Duration::ZERO)));
    let (api, seen) = api_counting(vec![401, 503, 200]);
    let client = sturdy::ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(src))
        .build(api);
    let req = Request::post("https://api.example.com/orders")
        .body(Full::from(r#"{"item":"book"}"#))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[0].0, "Bearer t-0");
    assert_eq!(seen[1].0, "Bearer t-1");
    assert_eq!(seen[2].0, "Bearer t-1");
    assert!(seen
        .iter()
        .all(|(_, b)| b.as_ref() == br#"{"item":"book"}"#));
    assert_eq!(ep.count.load(Ordering::SeqCst), 2);
}

/// The replay limit to the byte: a body of exactly the limit is replayed after a 401; one byte
/// more is sent once and its 401 returned, and the token is still invalidated.
#[tokio::test(start_paused = true)]
async fn the_replay_limit_is_exact() {
    for (len, replayed) in [(10usize, true), (11, false), (0, true)] {
        let (src, ep) = source(|n| (200, token(&format!("t-{n}"), "3600"), Some(Duration::ZERO)));
        let (api, seen) = api_counting(vec![401, 200, 200]);
        let svc = AuthLayer::oauth2(src).with_replay_limit(10).layer(api);
        let body = "x".repeat(len);
        let res = svc
            .clone()
            .oneshot(
                Request::post("https://api.example.com/o")
                    .body(Full::from(body.clone()))
                    .unwrap(),
            )
            .await
            .unwrap();
        if replayed {
            assert_eq!(res.status(), 200, "{len}");
            assert_eq!(seen.lock().unwrap().len(), 2);
            assert_eq!(seen.lock().unwrap()[1].1, body.as_bytes());
        } else {
            assert_eq!(res.status(), 401, "{len}");
            assert_eq!(seen.lock().unwrap().len(), 1);
            svc.oneshot(
                Request::get("https://api.example.com/o")
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
            assert_eq!(
                seen.lock().unwrap()[1].0,
                "Bearer t-1",
                "the token was not invalidated"
            );
        }
        assert_eq!(ep.count.load(Ordering::SeqCst), 2, "{len}");
    }
}

/// 403 is returned as is: no new token, no replay.
#[tokio::test(start_paused = true)]
async fn a_403_is_returned_as_is() {
    let (src, ep) = source(|n| (200, token(&format!("t-{n}"), "3600"), Some(Duration::ZERO)));
    let (api, seen) = api_counting(vec![403, 200]);
    let svc = AuthLayer::oauth2(src).layer(api);
    let res = svc
        .oneshot(
            Request::get("https://api.example.com/o")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(ep.count.load(Ordering::SeqCst), 1);
}

/// A custom source whose token cannot go in a header: the call fails with kind `Auth` (and the
/// token nowhere in it), and the token is invalidated.
#[derive(Debug, Default)]
struct Bad {
    invalidated: AtomicUsize,
}

impl TokenSource for Bad {
    fn token(&self) -> sturdy::auth::BoxFuture<Result<Token, BoxError>> {
        Box::pin(async { Ok(Token::new("TOK-BAD-s50b\r\nX-Evil: 1", None)) })
    }
    fn invalidate(&self, _token: &Token) {
        self.invalidated.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_token_that_cannot_be_sent_fails_with_auth_and_is_invalidated() {
    let bad = Arc::new(Bad::default());
    let (api, seen) = api_counting(vec![]);
    let svc = AuthLayer::token_source(bad.clone()).layer(api);
    let err = svc
        .oneshot(
            Request::get("https://api.example.com/o")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let e = err.downcast_ref::<Error>().expect("a sturdy_core::Error");
    assert_eq!(e.kind(), &ErrorKind::Auth, "{e}");
    assert!(!chain(&*err).contains("TOK-BAD"), "{}", chain(&*err));
    assert_eq!(bad.invalidated.load(Ordering::SeqCst), 1);
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent
    );
}

// ---------------------------------------------------------------------------------------------
// Static credentials

#[test]
fn static_credentials_that_cannot_be_sent_are_config_errors_without_the_secret() {
    let cases: Vec<(&str, Result<AuthLayer, Error>)> = vec![
        ("bearer empty", AuthLayer::bearer("")),
        ("bearer blanks", AuthLayer::bearer(" \t \t")),
        ("bearer newline", AuthLayer::bearer("SEC-s50b-a\nb")),
        ("bearer nul", AuthLayer::bearer("SEC-s50b-a\0b")),
        ("bearer del", AuthLayer::bearer("SEC-s50b-a\x7fb")),
        (
            "api key empty",
            AuthLayer::api_key(http::HeaderName::from_static("x-api-key"), ""),
        ),
        (
            "api key cr",
            AuthLayer::api_key(http::HeaderName::from_static("x-api-key"), "SEC-s50b\r"),
        ),
        (
            "query empty name",
            AuthLayer::api_key_query("", "SEC-s50b-q"),
        ),
        ("query empty key", AuthLayer::api_key_query("k", "  ")),
        ("basic colon", AuthLayer::basic("us:er", "SEC-s50b-pw")),
    ];
    for (what, r) in cases {
        let err = r.expect_err(what);
        assert_eq!(err.kind(), &ErrorKind::Config, "{what}: {err}");
        let text = chain(&err);
        assert!(!text.contains("SEC-s50b"), "{what}: {text}");
    }
    assert!(
        AuthLayer::basic("user", "").is_ok(),
        "an empty Basic password is allowed"
    );
    for layer in [
        AuthLayer::bearer("SEC-s50b-ok").unwrap(),
        AuthLayer::api_key(http::HeaderName::from_static("x-api-key"), "SEC-s50b-ok").unwrap(),
        AuthLayer::api_key_query("key", "SEC-s50b-ok").unwrap(),
        AuthLayer::basic("user", "SEC-s50b-ok").unwrap(),
    ] {
        assert!(!format!("{layer:?}").contains("SEC-s50b"));
    }
}

/// `api_key_query`: a parameter of that name already there, in any percent-encoding of the
/// name, is removed; every other pair is kept byte for byte.
#[tokio::test]
async fn api_key_query_replaces_any_encoding_of_the_name() {
    let (api, _) = api_counting(vec![]);
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| {
        s.lock().unwrap().push(req.uri().to_string());
        api.clone().oneshot(req)
    });
    let svc = AuthLayer::api_key_query("api_key", "K-s50b")
        .unwrap()
        .layer(api);
    for q in [
        "api_key=old&a=%2F&b=+",
        "api%5Fkey=old&a=%2F&b=+",
        "api%5fkey=old&a=%2F&b=+",
        "%61pi_key=old&a=%2F&b=+",
    ] {
        seen.lock().unwrap().clear();
        svc.clone()
            .oneshot(
                Request::get(format!("https://api.example.com/x?{q}"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        let uri = seen.lock().unwrap()[0].clone();
        assert!(!uri.contains("old"), "{q}: {uri}");
        assert!(uri.contains("a=%2F&b=+"), "{q}: {uri}");
        assert_eq!(uri.matches("K-s50b").count(), 1, "{q}: {uri}");
    }
}

/// `with_param` refuses the names the source sets itself, and an empty name.
#[test]
fn with_param_refuses_reserved_names() {
    let (src, _) = source(|_| (200, token("t", "1"), Some(Duration::ZERO)));
    for name in ["grant_type", "scope", "client_id", "client_secret", ""] {
        let err = src.clone().with_param(name, "x").unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config, "{name}");
    }
    assert!(src
        .clone()
        .with_param("resource", "https://api.example.com")
        .is_ok());
    let _ = src.with_client_auth(ClientAuth::SecretPost);
}

/// `SecretPost`: the id and secret are in the form body, form-encoded.
#[tokio::test]
async fn secret_post_sends_the_form_encoded_secret_in_the_body() {
    let (src, ep) = source(|_| (200, token("t", "3600"), Some(Duration::ZERO)));
    let src = src.with_client_auth(ClientAuth::SecretPost);
    src.get().await.unwrap();
    let body = ep.bodies.lock().unwrap()[0].clone();
    assert!(body.contains("grant_type=client_credentials"), "{body}");
    assert!(
        body.contains(&format!("client_secret={}", secret_forms()[1])),
        "{body}"
    );
    assert!(body.contains("client_id=client-s50b"), "{body}");
}

const SECRET_URL: &str =
    "https://tu:UPW-s50b-77@auth.example.com/oauth/token?tenant=Q%2DKEY-s50b&x=1";

fn no_url_secret(text: &str) {
    for s in ["UPW-s50b-77", "Q%2DKEY-s50b", "Q-KEY-s50b", "tenant="] {
        assert!(!text.contains(s), "{s} in {text}");
    }
}

/// "Messages name the token URL without its user info or query", also when the server echoes
/// it (user info, query, each value as written and percent-decoded); `Debug` likewise.
#[tokio::test(start_paused = true)]
async fn the_token_url_secrets_stay_out_of_messages() {
    let echo = format!("{SECRET_URL} UPW-s50b-77 Q%2DKEY-s50b Q-KEY-s50b");
    let e = echo.clone();
    let (src, _) = source_at(SECRET_URL, move |_| {
        (
            400,
            format!(r#"{{"error":"invalid_request","error_description":"{e}"}}"#),
            Some(Duration::ZERO),
        )
    });
    no_url_secret(&format!("{src:?}"));
    let err = src.get().await.unwrap_err();
    let text = chain(&err);
    assert!(text.contains("auth.example.com/oauth/token"), "{text}");
    no_url_secret(&text);
    // A silent endpoint and a zero token timeout: the wait's error names the endpoint too.
    let (src, _) = source_at(SECRET_URL, |_| (200, token("t", "3600"), None));
    let (api, seen) = api_counting(vec![]);
    let svc = AuthLayer::oauth2(src)
        .with_token_timeout(Duration::ZERO)
        .layer(api);
    let err = svc
        .oneshot(
            Request::post("https://api.example.com/o")
                .body(Full::from("x"))
                .unwrap(),
        )
        .await
        .unwrap_err();
    let e = err.downcast_ref::<Error>().expect("a sturdy_core::Error");
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{e}");
    assert!(e.is_retryable());
    let text = chain(&*err);
    assert!(
        text.contains("https://auth.example.com/oauth/token"),
        "{text}"
    );
    no_url_secret(&text);
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent
    );
}

/// "Clones share one cache. A `with_*` setter returns a source with a cache of its own."
#[tokio::test(start_paused = true)]
async fn clones_share_a_cache_and_setters_make_a_new_one() {
    let (src, ep) = source(|n| (200, token(&format!("t-{n}"), "3600"), Some(Duration::ZERO)));
    let twin = src.clone();
    assert_eq!(value(&src.get().await.unwrap()), "t-0");
    assert_eq!(value(&twin.get().await.unwrap()), "t-0");
    assert_eq!(ep.count.load(Ordering::SeqCst), 1);
    let other = src.clone().with_scopes(["b"]);
    assert_eq!(value(&other.get().await.unwrap()), "t-1");
    assert_eq!(value(&src.get().await.unwrap()), "t-0");
    assert_eq!(ep.count.load(Ordering::SeqCst), 2);
    assert!(ep.bodies.lock().unwrap()[1].contains("scope=b"));
}

/// Ten concurrent calls all answered 401 for the same token: one new token (one request for N
/// callers), every call replayed once with it; a 401 on the replay is returned as is.
#[tokio::test(start_paused = true)]
async fn concurrent_401s_share_one_refresh_and_a_second_401_is_returned() {
    let (src, ep) = source(|n| {
        (
            200,
            token(&format!("t-{n}"), "3600"),
            Some(Duration::from_millis(10)),
        )
    });
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
        s.lock().unwrap().push(auth.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let st = if auth == "Bearer t-0" { 401 } else { 200 };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(st)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let svc = AuthLayer::oauth2(src.clone()).layer(api);
    src.get().await.unwrap();
    let calls = (0..10).map(|i| {
        svc.clone().oneshot(
            Request::post("https://api.example.com/o")
                .body(Full::from(format!("b{i}")))
                .unwrap(),
        )
    });
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(
        ep.count.load(Ordering::SeqCst),
        2,
        "one refresh for ten 401s"
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 20);
        assert_eq!(seen.iter().filter(|a| *a == "Bearer t-1").count(), 10);
    }

    // Always 401: sent twice, the second 401 returned, two token requests in all.
    let (src, ep) = source(|n| (200, token(&format!("t-{n}"), "3600"), Some(Duration::ZERO)));
    let (api, seen) = api_counting(vec![401, 401, 401, 401]);
    let svc = AuthLayer::oauth2(src).layer(api);
    let res = svc
        .oneshot(
            Request::get("https://api.example.com/o")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_eq!(ep.count.load(Ordering::SeqCst), 2);
}
