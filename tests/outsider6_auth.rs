//! Outside tests of sturdy-auth against docs/guides/auth.md and the rustdoc of `sturdy_auth`:
//! a source used outside a runtime, a runtime shut down or left idle mid-request, the
//! documented floors of the lifetime settings, zero timeouts, the replay limit, custom token
//! sources, and secrets in the words of errors.
#![cfg(feature = "full")]

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, BoxFuture, ClientCredentials, ExposeSecret, Token, TokenSource};
use sturdy::core::{classify, find, BoxError, Delivery, ErrorKind};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

const TOKEN_URL: &str = "https://auth.example.com/oauth/token";

/// What the token endpoint does with one request.
#[derive(Clone, Debug)]
enum Reply {
    /// A status and body, at once.
    Now(u16, String),
    /// Never answers.
    Hang,
}

/// An in-process token endpoint: answers the scripted replies in order, then the fallback.
#[derive(Clone)]
struct Endpoint {
    script: Arc<Mutex<VecDeque<Reply>>>,
    fallback: Arc<Mutex<Reply>>,
    hits: Arc<AtomicUsize>,
}

fn token_body(name: &str, expires: &str) -> String {
    format!(r#"{{"access_token":"{name}","token_type":"Bearer","expires_in":{expires}}}"#)
}

impl Endpoint {
    fn new(fallback: Reply) -> Self {
        Self {
            script: Arc::default(),
            fallback: Arc::new(Mutex::new(fallback)),
            hits: Arc::default(),
        }
    }
    fn push(&self, r: Reply) {
        self.script.lock().unwrap().push_back(r);
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
        Future = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>>,
    > + Clone
           + Send
           + Sync
           + 'static {
        let me = self.clone();
        tower::service_fn(move |_req: Request<Full<Bytes>>| {
            me.hits.fetch_add(1, Ordering::SeqCst);
            let next = me.script.lock().unwrap().pop_front();
            let reply = next.unwrap_or_else(|| me.fallback.lock().unwrap().clone());
            Box::pin(async move {
                match reply {
                    Reply::Now(status, body) => Ok(Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::from(body))
                        .unwrap()),
                    Reply::Hang => std::future::pending().await,
                }
            })
                as Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>>
        })
    }
    fn source(&self) -> ClientCredentials {
        ClientCredentials::new(self.service(), TOKEN_URL, "my-client", "my-secret").unwrap()
    }
}

/// An API that answers the scripted statuses in order, then 200, and records the bearer and the
/// body of each call.
#[derive(Clone, Default)]
struct Api {
    script: Arc<Mutex<VecDeque<u16>>>,
    seen: Arc<Mutex<Vec<(String, Bytes)>>>,
}

impl Api {
    fn with(statuses: &[u16]) -> Self {
        let me = Self::default();
        me.script.lock().unwrap().extend(statuses.iter().copied());
        me
    }
    fn seen(&self) -> Vec<(String, Bytes)> {
        self.seen.lock().unwrap().clone()
    }
    fn service<B>(
        &self,
    ) -> impl Service<
        Request<B>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>>,
    > + Clone
           + Send
           + Sync
           + 'static
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let me = self.clone();
        tower::service_fn(move |req: Request<B>| {
            let me = me.clone();
            Box::pin(async move {
                let bearer = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap_or("<bytes>").to_owned())
                    .unwrap_or_default();
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map_err(Into::into)?
                    .to_bytes();
                me.seen.lock().unwrap().push((bearer, body));
                let status = me.script.lock().unwrap().pop_front().unwrap_or(200);
                Ok(Response::builder()
                    .status(status)
                    .body(Full::default())
                    .unwrap())
            })
                as Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>>
        })
    }
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// A minimal executor with no Tokio runtime: polls the future on this thread until it is ready.
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the future never finished"
        );
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

/// `ClientCredentials::get`: "# Errors ... or when called outside a Tokio runtime". An error,
/// not a panic.
#[test]
fn get_outside_a_tokio_runtime_is_an_error_not_a_panic() {
    let ep = Endpoint::new(Reply::Now(200, token_body("t-1", "3600")));
    let src = ep.source();
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| block_on(src.get())));
    let got = got.expect("ClientCredentials::get panicked outside a Tokio runtime");
    let err = got.expect_err("no runtime to run the token request on");
    eprintln!("outside a runtime: {err}");
    assert!(!err.to_string().contains("my-secret"));
}

/// The same through the layer: the call fails (not sent), it does not panic.
#[test]
fn a_layer_call_outside_a_tokio_runtime_is_an_error_not_a_panic() {
    let ep = Endpoint::new(Reply::Now(200, token_body("t-1", "3600")));
    let api = Api::default();
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service::<Full<Bytes>>());
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        block_on(svc.oneshot(get("http://api.example.com/")))
    }));
    let got = got.expect("the auth layer panicked outside a Tokio runtime");
    let err = got.expect_err("no runtime to fetch the token on");
    assert_eq!(classify::delivery(&*err), Delivery::NotSent, "{err}");
    assert!(api.seen().is_empty());
}

/// "if that runtime shuts down mid-request, the next caller starts a new request" (auth.md).
/// A runtime of its own starts a token request that hangs, its caller gives up, the runtime is
/// shut down; a caller on another runtime gets a token from a new request.
#[tokio::test]
async fn a_runtime_shut_down_mid_request_the_next_caller_starts_a_new_one() {
    let ep = Endpoint::new(Reply::Now(200, token_body("t-2", "3600")));
    ep.push(Reply::Hang);
    let src = ep.source();
    let other = src.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt
            .block_on(async { tokio::time::timeout(Duration::from_millis(30), other.get()).await });
        assert!(r.is_err(), "the first token request hangs");
        drop(rt);
    })
    .join()
    .unwrap();
    assert_eq!(ep.hits(), 1);
    let tok = tokio::time::timeout(Duration::from_secs(2), src.get())
        .await
        .expect("the next caller waited for a request lost with its runtime")
        .expect("a new request answers");
    assert_eq!(tok.secret().expose_secret(), "t-2");
    assert_eq!(ep.hits(), 2);
}

/// A caller already waiting (on its own runtime) when the runtime that runs the request shuts
/// down is not stranded: the request is started again for it, or it gets an error, well within
/// its token timeout.
#[tokio::test]
async fn a_waiter_on_another_runtime_is_not_stranded_when_the_request_runtime_shuts_down() {
    let ep = Endpoint::new(Reply::Now(200, token_body("t-2", "3600")));
    ep.push(Reply::Hang);
    let src = ep.source();
    let other = src.clone();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let fut = other.get();
            let mut fut = std::pin::pin!(fut);
            // Poll once so the request starts on this runtime, then hand over.
            let r = tokio::time::timeout(Duration::from_millis(20), &mut fut).await;
            assert!(r.is_err());
            started_tx.send(()).unwrap();
        });
        stop_rx.recv().unwrap();
        drop(rt);
    });
    started_rx.recv().unwrap();
    let waiter = tokio::spawn({
        let src = src.clone();
        async move { src.get().await }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    stop_tx.send(()).unwrap();
    thread.join().unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("a waiter stayed stranded after the request's runtime shut down")
        .unwrap();
    match got {
        Ok(tok) => assert_eq!(tok.secret().expose_secret(), "t-2"),
        Err(e) => eprintln!("the waiter got an error: {e}"),
    }
}

/// `with_default_lifetime`: "The lifetime assumed when the server sends no `expires_in` [1 h];
/// at least 1 s." A zero is taken as 1 s: a token is reused within its half second.
#[tokio::test(start_paused = true)]
async fn a_zero_default_lifetime_is_taken_as_one_second() {
    let ep = Endpoint::new(Reply::Now(
        200,
        r#"{"access_token":"t-1","token_type":"Bearer"}"#.to_owned(),
    ));
    let src = ep.source().with_default_lifetime(Duration::ZERO);
    let tok = src.get().await.unwrap();
    let left = tok.expires_at().expect("an expiry") - Instant::now();
    assert!(left >= Duration::from_millis(999), "lifetime {left:?}");
    tokio::time::advance(Duration::from_millis(300)).await;
    src.get().await.unwrap();
    settle().await;
    assert_eq!(ep.hits(), 1, "a token of at least 1 s was fetched again");
}

/// `with_max_lifetime`: "a larger `expires_in` is clamped to it. At least 1 s."
#[tokio::test(start_paused = true)]
async fn a_zero_max_lifetime_is_taken_as_one_second() {
    let ep = Endpoint::new(Reply::Now(200, token_body("t-1", "3600")));
    let src = ep.source().with_max_lifetime(Duration::ZERO);
    let tok = src.get().await.unwrap();
    let left = tok.expires_at().expect("an expiry") - Instant::now();
    assert!(
        left >= Duration::from_millis(999) && left <= Duration::from_secs(1),
        "lifetime {left:?}"
    );
    tokio::time::advance(Duration::from_millis(300)).await;
    src.get().await.unwrap();
    settle().await;
    assert_eq!(ep.hits(), 1);
}

/// `with_skew`: "never more than half the token's lifetime, so a short-lived token is not
/// refreshed on every call". A huge skew: a 100 s token is reused for its first 50 s.
#[tokio::test(start_paused = true)]
async fn a_huge_skew_is_capped_at_half_the_lifetime() {
    let ep = Endpoint::new(Reply::Now(200, token_body("t-1", "100")));
    let src = ep.source().with_skew(Duration::MAX);
    src.get().await.unwrap();
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(4)).await;
        src.get().await.unwrap();
        settle().await;
    }
    assert_eq!(ep.hits(), 1, "refreshed before half the lifetime");
    tokio::time::advance(Duration::from_secs(15)).await;
    let tok = src.get().await.unwrap();
    settle().await;
    assert_eq!(
        ep.hits(),
        2,
        "due after half the lifetime: refreshed in the background"
    );
    // The caller went on with the still-valid token.
    assert!(tok.expires_at().unwrap() > Instant::now());
}

/// auth.md: "`Duration::ZERO` means 'the cached token or fail at once'" and "The token request
/// goes on, and later callers share it."
#[tokio::test(start_paused = true)]
async fn a_zero_token_timeout_fails_at_once_and_the_request_goes_on() {
    let ep = Endpoint::new(Reply::Now(200, token_body("t-1", "3600")));
    let api = Api::default();
    let svc = AuthLayer::oauth2(ep.source())
        .with_token_timeout(Duration::ZERO)
        .layer(api.service::<Full<Bytes>>());
    let start = Instant::now();
    let r = svc.clone().oneshot(get("http://api.example.com/")).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    match r {
        Ok(_) => eprintln!("the token came on the first poll"),
        Err(err) => {
            let e = find::<sturdy::core::Error>(&*err).expect("a sturdy error");
            assert_eq!(e.kind(), &ErrorKind::Timeout, "{err}");
            assert_eq!(classify::delivery(&*err), Delivery::NotSent);
            assert!(err.to_string().contains(TOKEN_URL), "{err}");
        }
    }
    settle().await;
    svc.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .expect("the cached token, without waiting");
    assert_eq!(ep.hits(), 1);
}

/// `with_request_timeout`: "`Duration::ZERO` lets only an immediate answer through."
#[tokio::test(start_paused = true)]
async fn a_zero_request_timeout_lets_an_immediate_answer_through() {
    let ep = Endpoint::new(Reply::Now(200, token_body("t-1", "3600")));
    let src = ep.source().with_request_timeout(Duration::ZERO);
    let tok = src.get().await.expect("an immediate answer");
    assert_eq!(tok.secret().expose_secret(), "t-1");
}

/// `with_replay_limit`: "a larger or unbounded body is sent once and a 401 is returned as is".
#[tokio::test(start_paused = true)]
async fn a_body_over_the_replay_limit_is_sent_once_and_the_401_returned() {
    let ep = Endpoint::new(Reply::Now(200, token_body("t-1", "3600")));
    let api = Api::with(&[401]);
    let svc = AuthLayer::oauth2(ep.source())
        .with_replay_limit(4)
        .layer(api.service::<Full<Bytes>>());
    let req = Request::post("http://api.example.com/orders")
        .body(Full::from("0123456789"))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let seen = api.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].1, "0123456789");
    // A body at the limit is replayed.
    let api = Api::with(&[401]);
    let svc = AuthLayer::oauth2(ep.source())
        .with_replay_limit(10)
        .layer(api.service::<Full<Bytes>>());
    let req = Request::post("http://api.example.com/orders")
        .body(Full::from("0123456789"))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].1, "0123456789");
}

/// A body in chunks whose length is not known in advance (`From<Bytes>` as the layer requires).
struct Chunks(VecDeque<Bytes>);

impl From<Bytes> for Chunks {
    fn from(b: Bytes) -> Self {
        Self(VecDeque::from([b]))
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
    fn is_end_stream(&self) -> bool {
        false
    }
}

fn streamed(parts: &[&'static str]) -> Chunks {
    Chunks(
        parts
            .iter()
            .map(|p| Bytes::from_static(p.as_bytes()))
            .collect(),
    )
}

/// A streamed body of unknown length (within the limit once read) is either replayed whole or
/// sent once with the 401 returned; never replayed empty or cut.
#[tokio::test(start_paused = true)]
async fn a_streamed_body_is_never_replayed_cut() {
    let ep = Endpoint::new(Reply::Now(200, token_body("t-1", "3600")));
    let api = Api::with(&[401]);
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service::<Chunks>());
    let req = Request::post("http://api.example.com/orders")
        .body(streamed(&["ab", "cd", "ef"]))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let seen = api.seen();
    for (_, body) in &seen {
        assert_eq!(body, "abcdef", "a body sent cut: {seen:?}");
    }
    match res.status() {
        StatusCode::OK => assert_eq!(seen.len(), 2),
        StatusCode::UNAUTHORIZED => assert_eq!(seen.len(), 1),
        s => panic!("unexpected {s}"),
    }
}

/// A token source of our own.
#[derive(Debug)]
struct Custom {
    fail: Option<std::io::ErrorKind>,
    value: &'static str,
    describe: Option<&'static str>,
}

impl TokenSource for Custom {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        let fail = self.fail;
        let value = self.value;
        Box::pin(async move {
            match fail {
                Some(kind) => Err(Box::new(std::io::Error::new(kind, "vault sealed")) as BoxError),
                None => Ok(Token::new(value, None)),
            }
        })
    }
    fn invalidate(&self, _token: &Token) {}
    fn describe(&self) -> String {
        self.describe
            .map(str::to_owned)
            .unwrap_or_else(|| "the token source".to_owned())
    }
}

/// auth.md: "An error of your own `TokenSource` is wrapped in one (`could not get an access
/// token from <describe()>: ...`) unless it already is one." Not sent, and not the API's fault.
#[tokio::test(start_paused = true)]
async fn a_custom_source_error_is_wrapped_not_sent_and_cause_elsewhere() {
    for describe in [None, Some("the vault at vault.internal")] {
        let api = Api::default();
        let src = Custom {
            fail: Some(std::io::ErrorKind::ConnectionRefused),
            value: "",
            describe,
        };
        let svc = AuthLayer::token_source(Arc::new(src)).layer(api.service::<Full<Bytes>>());
        let err = svc
            .oneshot(get("http://api.example.com/"))
            .await
            .unwrap_err();
        let e = err
            .downcast_ref::<sturdy::core::Error>()
            .expect("downcast_ref finds the sturdy error");
        let expect = format!(
            "could not get an access token from {}: ",
            describe.unwrap_or("the token source")
        );
        assert!(e.to_string().starts_with(&expect), "{e}");
        assert!(e.to_string().contains("vault sealed"), "{e}");
        assert!(e.cause_is_elsewhere());
        assert_eq!(classify::delivery(&*err), Delivery::NotSent);
        assert!(
            find::<std::io::Error>(&*err).is_some(),
            "the cause is kept in the chain"
        );
        assert!(api.seen().is_empty());
    }
}

/// A custom source's token that cannot go in a header fails the call, without panicking, without
/// sending and without quoting the token.
#[tokio::test(start_paused = true)]
async fn a_custom_token_that_cannot_be_a_header_fails_cleanly() {
    let api = Api::default();
    let src = Custom {
        fail: None,
        value: "zzsecret\r\nX-Evil: 1",
        describe: None,
    };
    let svc = AuthLayer::token_source(Arc::new(src)).layer(api.service::<Full<Bytes>>());
    let r = svc.oneshot(get("http://api.example.com/")).await;
    match r {
        Ok(_) => panic!("a token with CR LF was sent: {:?}", api.seen()),
        Err(err) => {
            assert!(!format!("{err} {err:?}").contains("zzsecret"), "{err:?}");
            assert!(err.downcast_ref::<sturdy::core::Error>().is_some(), "{err}");
            assert_eq!(classify::delivery(&*err), Delivery::NotSent);
        }
    }
    assert!(api.seen().is_empty());
}

/// Some providers (GitHub's OAuth apps by default) answer a token request form-encoded, not in
/// JSON. The error says the body is not JSON, and shows neither the token it carries nor the
/// client secret: "no `Debug` output or `tracing` event shows a secret".
#[tokio::test(start_paused = true)]
async fn a_form_encoded_token_response_does_not_leak_the_token_in_the_error() {
    let ep = Endpoint::new(Reply::Now(
        200,
        "access_token=gho_LEAKEDTOKEN123&scope=repo&token_type=bearer".to_owned(),
    ));
    let err = ep.source().get().await.unwrap_err();
    let words = format!("{err} | {err:?}");
    eprintln!("form-encoded: {err}");
    assert!(!words.contains("LEAKEDTOKEN"), "{words}");
    let api = Api::default();
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service::<Full<Bytes>>());
    let err = svc
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap_err();
    let words = format!("{err} | {err:?}");
    assert!(!words.contains("LEAKEDTOKEN"), "{words}");
}

/// A token response that is JSON but malformed in one field still carries the token: the error
/// must not quote it.
#[tokio::test(start_paused = true)]
async fn a_malformed_token_response_does_not_leak_the_token() {
    for body in [
        r#"{"access_token":"LEAKEDTOKEN456","token_type":"Bearer","expires_in":"soon"}"#,
        r#"{"access_token":"LEAKEDTOKEN456","token_type":"Bearer","expires_in":0}"#,
        r#"{"access_token":"LEAKEDTOKEN456","token_type":"Bearer","expires_in":-1}"#,
        r#"{"access_token":"LEAKEDTOKEN456","token_type":"Bearer","expires_in":3600"#,
        r#"{"access_token":["LEAKEDTOKEN456"],"token_type":"Bearer"}"#,
        r#"{"access_token":"LEAKEDTOKEN456","token_type":"mac","expires_in":3600}"#,
    ] {
        let ep = Endpoint::new(Reply::Now(200, body.to_owned()));
        match ep.source().get().await {
            Ok(t) => eprintln!(
                "accepted {body}: expires {:?}",
                t.expires_at().map(|e| e - Instant::now())
            ),
            Err(err) => {
                let words = format!("{err} | {err:?}");
                eprintln!("{body}: {err}");
                assert!(!words.contains("LEAKEDTOKEN"), "{words}");
            }
        }
    }
}

/// A token endpoint error status whose body echoes the request (some gateways do): the client
/// secret sent in the body (`client_secret_post`) must not reach the error's words.
#[tokio::test(start_paused = true)]
async fn an_echoed_request_in_an_error_body_does_not_leak_the_secret() {
    let ep = Endpoint::new(Reply::Now(
        400,
        "bad request: grant_type=client_credentials&client_id=my-client&client_secret=my-secret"
            .to_owned(),
    ));
    let err = ep.source().get().await.unwrap_err();
    let words = format!("{err} | {err:?}");
    eprintln!("echo: {err}");
    assert!(!words.contains("my-secret"), "{words}");
}

/// `Token`: "`Debug` shows neither the token nor any part of it." `ClientCredentials`:
/// "`Debug` never shows the secret or a token." A cached token included.
#[tokio::test(start_paused = true)]
async fn debug_shows_no_part_of_a_token_or_secret() {
    let tok = Token::new("qqqqqqqqqqzzzzzzzzzz", None);
    let d = format!("{tok:?}");
    assert!(!d.contains("qqq") && !d.contains("zzz"), "{d}");
    let ep = Endpoint::new(Reply::Now(200, token_body("qqqqqqqqqqzzzzzzzzzz", "3600")));
    let src = ClientCredentials::new(
        ep.service(),
        "https://auth.example.com/oauth/token?client_secret=wwwwwwww",
        "my-client",
        "xxxxxxxxxxyyyyyyyy",
    )
    .unwrap();
    src.get().await.unwrap();
    let api = Api::default();
    let layer = AuthLayer::oauth2(src.clone());
    let svc = layer.clone().layer(api.service::<Full<Bytes>>());
    svc.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    for d in [format!("{src:?}"), format!("{layer:?}")] {
        for bit in ["qqq", "zzz", "xxx", "yyy", "www"] {
            assert!(!d.contains(bit), "{bit} in {d}");
        }
    }
}

/// auth.md: "After a 401, a failed token wait for the replay is different: the API saw the first
/// attempt and answered it, so the error says `Delivery::MaybeProcessed`". Its words must not
/// say the request was not sent.
#[tokio::test(start_paused = true)]
async fn a_token_wait_that_times_out_before_the_replay_does_not_say_not_sent() {
    let ep = Endpoint::new(Reply::Hang);
    ep.push(Reply::Now(200, token_body("t-1", "3600")));
    let api = Api::with(&[401]);
    let svc = AuthLayer::oauth2(ep.source())
        .with_token_timeout(Duration::from_secs(1))
        .layer(api.service::<Full<Bytes>>());
    let req = Request::post("http://api.example.com/orders")
        .body(Full::from("{}"))
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    assert_eq!(api.seen().len(), 1);
    assert_eq!(classify::delivery(&*err), Delivery::MaybeProcessed, "{err}");
    let words = err.to_string();
    eprintln!("replay token wait: {words}");
    assert!(
        !words.contains("not sent"),
        "the API answered the first attempt, yet: {words}"
    );
    let e = err.downcast_ref::<sturdy::core::Error>().unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    let summary = sturdy::core::ErrorSummary::of(&*err);
    assert!(summary.may_have_been_processed, "{summary:?}");
}

/// The same with a token endpoint that refuses (500) the refresh after the 401.
#[tokio::test(start_paused = true)]
async fn a_refused_refresh_before_the_replay_says_maybe_processed_and_not_not_sent() {
    let ep = Endpoint::new(Reply::Now(500, "{}".to_owned()));
    ep.push(Reply::Now(200, token_body("t-1", "3600")));
    let api = Api::with(&[401]);
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service::<Full<Bytes>>());
    let err = svc
        .oneshot(get("http://api.example.com/orders"))
        .await
        .unwrap_err();
    assert_eq!(classify::delivery(&*err), Delivery::MaybeProcessed, "{err}");
    let words = err.to_string();
    eprintln!("replay refresh refused: {words}");
    assert!(!words.contains("not sent"), "{words}");
    let e = err.downcast_ref::<sturdy::core::Error>().unwrap();
    assert!(e.cause_is_elsewhere());
}

/// agents.md: `status`: "the token endpoint's when getting a token failed: the message names it,
/// and `may_have_been_processed` is false". Through `ClientBuilder` with its retries: a 503 from
/// the token endpoint is retried, and the summary speaks of the token endpoint.
#[tokio::test(start_paused = true)]
async fn a_token_endpoint_503_through_the_client_is_summarised_as_the_token_endpoints() {
    let ep = Endpoint::new(Reply::Now(503, "{}".to_owned()));
    let api = Api::default();
    let client = sturdy::ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(ep.source()))
        .build(api.service::<Full<Bytes>>());
    let req = Request::post("http://api.example.com/orders")
        .body(Full::from("{}"))
        .unwrap();
    let err = client.oneshot(req).await.unwrap_err();
    let s = sturdy::core::ErrorSummary::of(&*err);
    eprintln!("summary: {s:?}");
    assert_eq!(s.status, Some(503));
    assert!(!s.may_have_been_processed);
    assert!(s.retryable);
    assert!(s.message.contains(TOKEN_URL), "{}", s.message);
    assert!(api.seen().is_empty());
    assert!(ep.hits() >= 1);
}
