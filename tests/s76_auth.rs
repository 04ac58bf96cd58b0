#![cfg(feature = "full")]
//! s76: an outside round on `sturdy-auth`, on angles earlier rounds did not try: event callbacks
//! that call back into the source or panic, a 401 whose body never ends, a request body that
//! lies about its size, the replay as the same request, the caller's own credentials, odd client
//! ids and secrets through both client auth methods, `expires_in` strings at their bounds, an
//! API key on a URI near its length limit, odd token-endpoint answers (302, a 200 carrying an
//! `error`), scopes and audience on the wire, seeded cancellation over the wire under `Buffer`
//! and `ConcurrencyLimit(1)`, and the real oauth2-mock-server (`STURDY_S76_OAUTH_URL`, skipped
//! when unset).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, ClientAuth, ClientCredentials, ExposeSecret, Token, TokenSource};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, ErrorKind};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const TOKEN_URL: &str = "https://auth.s76.test/oauth/token";
const CLIENT_ID: &str = "s76-client";
const SECRET: &str = "S76SECRETkw3";

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Awaits `f`, failing instead of hanging.
async fn within<F: Future>(what: &str, d: Duration, f: F) -> F::Output {
    match tokio::time::timeout(d, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {d:?}"),
    }
}

fn get_req() -> Req {
    Request::get("https://api.s76.test/orders")
        .body(Full::default())
        .unwrap()
}

fn err_of(e: &BoxError) -> &sturdy::core::Error {
    e.downcast_ref::<sturdy::core::Error>()
        .unwrap_or_else(|| panic!("not a sturdy_core::Error: {e:?}"))
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(" | ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// What an in-process token endpoint saw.
#[derive(Clone, Default)]
struct Seen {
    hits: Arc<AtomicUsize>,
    reqs: Arc<Mutex<Vec<(http::request::Parts, Bytes)>>>,
}
impl Seen {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    fn last(&self) -> (http::request::Parts, Bytes) {
        self.reqs.lock().unwrap().last().cloned().unwrap()
    }
}

/// An in-process token endpoint: `answer(n)` (n from 1) gives status, headers and body.
fn endpoint(
    answer: impl Fn(usize) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync + 'static,
) -> (
    impl Service<Req, Response = Res, Error = BoxError, Future: Send + 'static> + Clone + Send + 'static,
    Seen,
) {
    let seen = Seen::default();
    let s = seen.clone();
    let answer = Arc::new(answer);
    let svc = tower::service_fn(move |req: Req| {
        let s = s.clone();
        let answer = answer.clone();
        async move {
            let n = s.hits.fetch_add(1, Ordering::SeqCst) + 1;
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            s.reqs.lock().unwrap().push((parts, body));
            let (status, headers, body) = answer(n);
            let mut b = Response::builder().status(status);
            for (k, v) in headers {
                b = b.header(k, v);
            }
            Ok::<_, BoxError>(b.body(Full::from(body)).unwrap())
        }
    });
    (svc, seen)
}

fn json() -> Vec<(&'static str, String)> {
    vec![("content-type", "application/json".to_string())]
}

fn tok(n: usize, expires_in: &str) -> String {
    format!(r#"{{"access_token":"TOK76-{n}","token_type":"Bearer","expires_in":{expires_in}}}"#)
}

fn good_endpoint() -> (
    impl Service<Req, Response = Res, Error = BoxError, Future: Send + 'static> + Clone + Send + 'static,
    Seen,
) {
    endpoint(|n| (200, json(), tok(n, "3600")))
}

fn creds<S>(svc: S) -> ClientCredentials
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    ClientCredentials::new(svc, TOKEN_URL, CLIENT_ID, SECRET).unwrap()
}

// ---------- small decoders for what went on the wire ----------

fn b64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(h, 16).expect("hex"));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).expect("utf-8")
}

/// The form pairs of a body, decoded.
fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    std::str::from_utf8(body)
        .unwrap()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

// ---------- bodies ----------

/// A body that yields 8 KiB every millisecond, forever, claiming `hint` as its exact size.
struct Endless {
    sleep: Pin<Box<tokio::time::Sleep>>,
    hint: Option<u64>,
    yielded: Arc<AtomicUsize>,
}
impl Endless {
    fn new(hint: Option<u64>, yielded: Arc<AtomicUsize>) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep(ms(1))),
            hint,
            yielded,
        }
    }
}
impl Body for Endless {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let next = tokio::time::Instant::now() + ms(1);
        self.sleep.as_mut().reset(next);
        self.yielded.fetch_add(8192, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 8192])))))
    }
    fn size_hint(&self) -> SizeHint {
        match self.hint {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// A request body: either an endless liar or plain bytes (what a replay is rebuilt from).
enum ReqBody {
    Liar(Endless),
    Plain(Full<Bytes>),
}
impl From<Bytes> for ReqBody {
    fn from(b: Bytes) -> Self {
        Self::Plain(Full::new(b))
    }
}
impl Body for ReqBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Liar(e) => Pin::new(e).poll_frame(cx),
            Self::Plain(f) => Pin::new(f).poll_frame(cx),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Liar(e) => e.size_hint(),
            Self::Plain(f) => f.size_hint(),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            Self::Liar(_) => false,
            Self::Plain(f) => f.is_end_stream(),
        }
    }
}

// =====================================================================================
// Event callbacks
// =====================================================================================

/// `ClientCredentials::on_event`: "It runs in the task that requests the token, with no lock
/// held." So a callback may call back into the source (invalidate, describe, Debug, even start
/// a `get` of its own) without a deadlock. Run on a thread of its own so a deadlock shows as a
/// failure, not a stuck suite.
#[test]
fn s76_an_event_callback_may_call_back_into_the_source() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let out = rt.block_on(async {
            let (svc, seen) = good_endpoint();
            let cell: Arc<OnceLock<ClientCredentials>> = Arc::new(OnceLock::new());
            let c2 = cell.clone();
            let calls = Arc::new(AtomicUsize::new(0));
            let calls2 = calls.clone();
            let src = creds(svc).on_event(move |e| {
                if let (Event::TokenFetched { .. }, Some(s)) = (e, c2.get()) {
                    calls2.fetch_add(1, Ordering::SeqCst);
                    s.invalidate(&Token::new("not-the-cached-one", None));
                    let d = format!("{s:?} {}", s.describe());
                    assert!(!d.contains(SECRET));
                    let s = s.clone();
                    tokio::spawn(async move {
                        let _ = s.get().await;
                    });
                }
            });
            cell.set(src.clone()).unwrap();
            let t1 = src.get().await.map_err(|e| e.to_string())?;
            let t2 = src.get().await.map_err(|e| e.to_string())?;
            tokio::time::sleep(ms(20)).await;
            Ok::<_, String>((
                t1.secret().expose_secret().to_string(),
                t2.secret().expose_secret().to_string(),
                seen.hits(),
                calls.load(Ordering::SeqCst),
            ))
        });
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(secs(5))
        .expect("a callback calling back into the source deadlocked (no answer in 5 s)")
        .expect("get failed");
    assert_eq!(out.0, "TOK76-1");
    assert_eq!(out.1, "TOK76-1", "the cached token was not reused");
    assert_eq!(out.2, 1, "one token request");
    assert_eq!(out.3, 1, "one TokenFetched event");
}

/// A callback that panics once (a bug in the user's metrics code) must not strand the callers
/// waiting for that token request, nor the source: every caller gets an answer in bounded time
/// and the next call gets a token.
#[tokio::test(start_paused = true)]
async fn s76_a_panicking_event_callback_strands_no_caller() {
    let (svc, seen) = good_endpoint();
    let panicked = Arc::new(AtomicBool::new(false));
    let p = panicked.clone();
    let src = creds(svc).on_event(move |e| {
        if matches!(e, Event::TokenFetched { .. }) && !p.swap(true, Ordering::SeqCst) {
            panic!("s76: a callback that panics");
        }
    });
    let mut waiters = Vec::new();
    for _ in 0..8 {
        let s = src.clone();
        waiters.push(tokio::spawn(async move { s.get().await }));
    }
    for w in waiters {
        let r = within("a waiter of the panicked request", secs(120), w)
            .await
            .expect("the waiter's task itself did not panic");
        if let Err(e) = r {
            let m = e.to_string();
            assert!(!m.contains(SECRET), "{m}");
        }
    }
    assert!(panicked.load(Ordering::SeqCst));
    let t = within("the next caller", secs(120), src.get())
        .await
        .unwrap_or_else(|e| panic!("the source is broken after a panicking callback: {e}"));
    assert!(t.secret().expose_secret().starts_with("TOK76-"));
    assert!(seen.hits() <= 3, "token requests: {}", seen.hits());
}

// =====================================================================================
// The 401 replay
// =====================================================================================

/// A 401 whose body never ends (a misbehaving gateway streaming an error page) is not read to
/// its end before the replay: the replay goes out, its 200 comes back.
#[tokio::test(start_paused = true)]
async fn s76_a_401_with_an_endless_body_is_replayed_without_draining_it() {
    let (tsvc, seen) = good_endpoint();
    let yielded = Arc::new(AtomicUsize::new(0));
    let y = yielded.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = tower::service_fn(move |req: Req| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        let y = y.clone();
        async move {
            let auth = req.headers()["authorization"].to_str().unwrap().to_string();
            let res = if n == 0 {
                assert_eq!(auth, "Bearer TOK76-1");
                Response::builder()
                    .status(401)
                    .body(UnsyncBoxBody::new(
                        Endless::new(None, y).map_err(|e| -> BoxError { match e {} }),
                    ))
                    .unwrap()
            } else {
                assert_eq!(auth, "Bearer TOK76-2");
                Response::new(UnsyncBoxBody::new(
                    Full::from("ok").map_err(|e| -> BoxError { match e {} }),
                ))
            };
            Ok::<_, BoxError>(res)
        }
    });
    let svc = AuthLayer::oauth2(creds(tsvc)).layer(api);
    let res = within("the call", secs(30), svc.oneshot(get_req()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(seen.hits(), 2);
    assert!(
        yielded.load(Ordering::SeqCst) <= 1024 * 1024,
        "the 401's body was read: {} bytes",
        yielded.load(Ordering::SeqCst)
    );
}

/// docs/RELIABILITY.md: "request bodies kept for a replay | ... one whose size hint said it
/// fits but which yields more is refused (not sent) once the limit has arrived". A body that
/// says it is 10 bytes and never ends is refused with a `Body` error, never sent, and read no
/// further than about the limit.
#[tokio::test(start_paused = true)]
async fn s76_a_body_that_lies_about_its_size_is_refused_unsent_at_the_limit() {
    let (tsvc, _seen) = good_endpoint();
    let sent = Arc::new(AtomicUsize::new(0));
    let s = sent.clone();
    let api = tower::service_fn(move |_req: Request<ReqBody>| {
        s.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(Response::new(Full::<Bytes>::default())) }
    });
    let limit = 64 * 1024;
    let svc = AuthLayer::oauth2(creds(tsvc))
        .with_replay_limit(limit)
        .layer(api);
    let yielded = Arc::new(AtomicUsize::new(0));
    let req = Request::post("https://api.s76.test/upload")
        .body(ReqBody::Liar(Endless::new(Some(10), yielded.clone())))
        .unwrap();
    // 3 s of paused time: 3000 frames, 24 MiB, if the body is read without a limit.
    let Ok(r) = tokio::time::timeout(secs(3), svc.oneshot(req)).await else {
        panic!(
            "the call did not finish within 3 s: {} bytes of a body that said 10 were read \
             (limit {limit}) and reading goes on",
            yielded.load(Ordering::SeqCst)
        );
    };
    let e = r.expect_err("a body past its own size hint and the limit was sent");
    let err = err_of(&e);
    assert_eq!(err.kind(), &ErrorKind::Body, "{}", chain(&*e));
    assert_eq!(sent.load(Ordering::SeqCst), 0, "sent anyway");
    assert_eq!(
        sturdy::core::classify::delivery(&*e),
        sturdy::core::Delivery::NotSent,
        "{}",
        chain(&*e)
    );
    let read = yielded.load(Ordering::SeqCst);
    assert!(
        read <= limit + 8192,
        "read {read} bytes of a body over a {limit}-byte limit"
    );
}

#[derive(Clone, Debug, PartialEq)]
struct Trace(&'static str);

/// The replay after a 401 is the same request: method, URI, version, every header (repeated
/// ones in order), extensions and body; only the token differs.
#[tokio::test(start_paused = true)]
async fn s76_the_replay_is_the_same_request_with_a_new_token() {
    let (tsvc, _) = good_endpoint();
    type Got = (
        http::Method,
        http::Uri,
        Version,
        Vec<(String, String)>,
        Option<Trace>,
        Bytes,
    );
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let g = got.clone();
    let api = tower::service_fn(move |req: Req| {
        let g = g.clone();
        async move {
            let (p, b) = req.into_parts();
            let body = b.collect().await.unwrap().to_bytes();
            let headers = p
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
                .collect();
            let n = {
                let mut g = g.lock().unwrap();
                g.push((
                    p.method.clone(),
                    p.uri.clone(),
                    p.version,
                    headers,
                    p.extensions.get::<Trace>().cloned(),
                    body,
                ));
                g.len()
            };
            let status = if n == 1 { 401 } else { 201 };
            Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
        }
    });
    let svc = AuthLayer::oauth2(creds(tsvc)).layer(api);
    let mut req = Request::builder()
        .method("PATCH")
        .uri("https://api.s76.test/orders/7?a=1&a=2&b=%20x")
        .version(Version::HTTP_10)
        .header("x-multi", "one")
        .header("x-multi", "two")
        .header("content-type", "application/json")
        .header("authorization", "Bearer caller-own")
        .body(Full::from(r#"{"qty":3}"#))
        .unwrap();
    req.extensions_mut().insert(Trace("t-76"));
    let res = within("the call", secs(30), svc.oneshot(req))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    let strip = |h: &[(String, String)]| -> Vec<(String, String)> {
        h.iter()
            .filter(|(k, _)| k != "authorization")
            .cloned()
            .collect()
    };
    let auths = |h: &[(String, String)]| -> Vec<String> {
        h.iter()
            .filter(|(k, _)| k == "authorization")
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(auths(&got[0].3), vec!["Bearer TOK76-1".to_string()]);
    assert_eq!(auths(&got[1].3), vec!["Bearer TOK76-2".to_string()]);
    assert_eq!(got[0].0, got[1].0);
    assert_eq!(got[0].1, got[1].1);
    assert_eq!(got[1].1, "https://api.s76.test/orders/7?a=1&a=2&b=%20x");
    assert_eq!(got[0].2, got[1].2);
    assert_eq!(got[1].2, Version::HTTP_10);
    assert_eq!(strip(&got[0].3), strip(&got[1].3));
    assert_eq!(
        strip(&got[1].3)
            .iter()
            .filter(|(k, _)| k == "x-multi")
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>(),
        ["one", "two"]
    );
    assert_eq!(got[0].4, Some(Trace("t-76")));
    assert_eq!(
        got[1].4,
        Some(Trace("t-76")),
        "the replay lost the extensions"
    );
    assert_eq!(got[0].5, got[1].5);
}

/// A caller's own `Authorization` (or API key header) is replaced by the layer's: one value
/// goes out, the layer's, for every kind of credentials.
#[tokio::test(start_paused = true)]
async fn s76_the_callers_own_credentials_are_replaced_not_doubled() {
    let seen: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let s = seen.clone();
    let api = tower::service_fn(move |req: Req| {
        let vals = ["authorization", "x-api-key"]
            .iter()
            .flat_map(|h| req.headers().get_all(*h).iter())
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        s.lock().unwrap().push(vals);
        async { Ok::<_, BoxError>(Response::new(())) }
    });
    let (tsvc, _) = good_endpoint();
    let layers = [
        AuthLayer::bearer("layer-bearer").unwrap(),
        AuthLayer::basic("u", "p").unwrap(),
        AuthLayer::api_key(HeaderName::from_static("x-api-key"), "layer-key").unwrap(),
        AuthLayer::oauth2(creds(tsvc)),
    ];
    for l in layers {
        let req = Request::get("https://api.s76.test/x")
            .header("authorization", "Bearer caller-1")
            .header("authorization", "Bearer caller-2")
            .body(Full::default())
            .unwrap();
        within("call", secs(30), l.layer(api.clone()).oneshot(req))
            .await
            .unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0], ["Bearer layer-bearer"]);
    assert_eq!(seen[1], [format!("Basic {}", "dTpw")]);
    // The API key layer adds its header; the caller's Authorization is not the layer's business.
    assert!(seen[2].contains(&"layer-key".to_string()), "{:?}", seen[2]);
    assert_eq!(seen[2].iter().filter(|v| *v == "layer-key").count(), 1);
    assert_eq!(seen[3], ["Bearer TOK76-1"]);
}

// =====================================================================================
// Credentials on the wire
// =====================================================================================

/// RFC 6749 §2.3.1 (which the docs cite for `ClientAuth::SecretBasic`: "with the id and secret
/// form-encoded first"): an id with `:` and a secret with `:`, `+`, `%`, `&`, `=`, a space and
/// non-ASCII come back exactly after base64 and form decoding; with `SecretPost` they come back
/// from the form body. `AuthLayer::basic` (RFC 7617) keeps a password with `:` and non-ASCII.
#[tokio::test(start_paused = true)]
async fn s76_odd_client_ids_and_secrets_decode_back_exactly() {
    let id = "svc:acct é+1";
    let secret = "p:ss w%rd&x=y+ü/?#";
    for auth in [ClientAuth::SecretBasic, ClientAuth::SecretPost] {
        let (tsvc, seen) = good_endpoint();
        let src = ClientCredentials::new(tsvc, TOKEN_URL, id, secret)
            .unwrap()
            .with_client_auth(auth);
        within("get", secs(30), src.get()).await.unwrap();
        let (parts, body) = seen.last();
        let pairs = form_pairs(&body);
        let find = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(find("grant_type").as_deref(), Some("client_credentials"));
        if matches!(auth, ClientAuth::SecretBasic) {
            let h = parts.headers["authorization"].to_str().unwrap().to_string();
            let b = h.strip_prefix("Basic ").expect("Basic");
            let decoded = String::from_utf8(b64_decode(b)).unwrap();
            let (u, p) = decoded
                .split_once(':')
                .expect("one ':' between id and secret");
            assert_eq!(form_decode(u), id, "{decoded}");
            assert_eq!(form_decode(p), secret, "{decoded}");
            assert_eq!(find("client_secret"), None, "the secret also in the body");
        } else {
            assert!(parts.headers.get("authorization").is_none());
            assert_eq!(find("client_id").as_deref(), Some(id));
            assert_eq!(find("client_secret").as_deref(), Some(secret));
        }
    }
    let seen: Arc<Mutex<String>> = Arc::default();
    let s = seen.clone();
    let api = tower::service_fn(move |req: Req| {
        *s.lock().unwrap() = req.headers()["authorization"].to_str().unwrap().into();
        async { Ok::<_, BoxError>(Response::new(())) }
    });
    let l = AuthLayer::basic("us ér", "p:ss wörd").unwrap();
    l.layer(api).oneshot(get_req()).await.unwrap();
    let h = seen.lock().unwrap().clone();
    let decoded = String::from_utf8(b64_decode(h.strip_prefix("Basic ").unwrap())).unwrap();
    assert_eq!(decoded, "us ér:p:ss wörd");
}

/// `with_scopes` ("sent space-separated in `scope`") and `with_audience`: the scopes and the
/// audience arrive as set, once each; a later `with_audience` replaces the earlier.
#[tokio::test(start_paused = true)]
async fn s76_scopes_and_audience_go_out_once_as_set() {
    let (tsvc, seen) = good_endpoint();
    let src = creds(tsvc)
        .with_scopes(["orders:read", "https://api.s76.test/a&b=c"])
        .with_audience("first")
        .with_audience("https://api.s76.test/?x=1&y=2");
    within("get", secs(30), src.get()).await.unwrap();
    let (_, body) = seen.last();
    let pairs = form_pairs(&body);
    let all = |k: &str| -> Vec<String> {
        pairs
            .iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(
        all("scope"),
        ["orders:read https://api.s76.test/a&b=c"],
        "{pairs:?}"
    );
    assert_eq!(
        all("audience"),
        ["https://api.s76.test/?x=1&y=2"],
        "{pairs:?}"
    );
    assert_eq!(all("grant_type"), ["client_credentials"]);
}

/// `with_scopes` with no scope at all asks for none: no `scope=` (an empty scope is refused as
/// `invalid_scope` by some servers).
#[tokio::test(start_paused = true)]
async fn s76_no_scopes_send_no_scope_parameter() {
    let (tsvc, seen) = good_endpoint();
    let src = creds(tsvc).with_scopes(Vec::<String>::new());
    within("get", secs(30), src.get()).await.unwrap();
    let (_, body) = seen.last();
    let pairs = form_pairs(&body);
    assert!(
        !pairs.iter().any(|(k, _)| k == "scope"),
        "an empty scope went out: {pairs:?}"
    );
}

/// `api_key_query`: "An API key in the query parameter `param`, appended to the caller's query."
/// On a URI near `http`'s length limit (65534 bytes) the key no longer fits: the request must not
/// go out without it silently (the API would answer 401 with no word of why).
#[tokio::test(start_paused = true)]
async fn s76_an_api_key_that_no_longer_fits_the_uri_is_not_dropped_silently() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let api = tower::service_fn(move |req: Req| {
        s.lock().unwrap().push(req.uri().to_string());
        async { Ok::<_, BoxError>(Response::new(())) }
    });
    let l = AuthLayer::api_key_query("api_key", "K".repeat(200)).unwrap();
    let path = format!("/{}", "p".repeat(65_400));
    let uri = format!("https://api.s76.test{path}?x=1");
    let req = Request::get(uri.as_str()).body(Full::default()).unwrap();
    let r = within("call", secs(30), l.layer(api).oneshot(req)).await;
    match r {
        Ok(_) => {
            let sent = seen.lock().unwrap().pop().unwrap();
            assert!(
                sent.contains("api_key=KKK"),
                "the request went out without its API key (uri of {} bytes)",
                sent.len()
            );
        }
        Err(e) => {
            assert!(seen.lock().unwrap().is_empty());
            let m = chain(&*e);
            assert!(!m.contains("KKKK"), "the key in an error: {m}");
        }
    }
}

// =====================================================================================
// Token responses
// =====================================================================================

/// RFC 6749 and docs/RELIABILITY.md: "a string of digits, `"3600"`, as some servers send, is
/// read as the number", and "zero, negative ...: an error", "absurd: 24 h". So the string
/// `"0"` is an error naming `expires_in`, `"0003600"` is 3600 s, and thirty nines are 24 h.
#[tokio::test(start_paused = true)]
async fn s76_expires_in_strings_of_digits_at_their_bounds() {
    let day = secs(86_400);
    let cases: [(&str, Option<Duration>); 4] = [
        (r#""0003600""#, Some(secs(3600))),
        (r#""999999999999999999999999999999""#, Some(day)),
        (r#""18446744073709551616""#, Some(day)),
        (r#""0""#, None),
    ];
    for (value, want) in cases {
        let v = value.to_string();
        let (tsvc, seen) = endpoint(move |n| (200, json(), tok(n, &v)));
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let src = creds(tsvc).on_event(move |e| {
            if let Event::TokenFetched { lifetime, .. } = e {
                g.lock().unwrap().push(*lifetime);
            }
        });
        let r = within("get", secs(60), src.get()).await;
        match want {
            Some(d) => {
                r.unwrap_or_else(|e| panic!("expires_in {value}: {e}"));
                assert_eq!(got.lock().unwrap().clone(), vec![d], "expires_in {value}");
            }
            None => {
                let e = r.expect_err(value);
                assert!(e.to_string().contains("expires_in"), "{value}: {e}");
                assert!(!e.to_string().contains("TOK76"), "{e}");
            }
        }
        assert_eq!(seen.hits(), 1, "{value}");
    }
}

/// Odd token-endpoint answers name their cause: a 302 names the status (the token client does
/// not follow redirects); a 401 with an empty body names 401. Neither quotes the secret, neither
/// is retryable.
#[tokio::test(start_paused = true)]
async fn s76_odd_token_endpoint_answers_name_their_cause() {
    let cases: Vec<(u16, Vec<(&'static str, String)>, String, &str)> = vec![
        (
            302,
            vec![("location", format!("https://login.s76.test/?s={SECRET}"))],
            String::new(),
            "302",
        ),
        (
            401,
            vec![("www-authenticate", "Basic realm=\"s76\"".into())],
            String::new(),
            "401",
        ),
    ];
    for (status, headers, body, want) in cases {
        let (tsvc, seen) = endpoint(move |_| (status, headers.clone(), body.clone()));
        let src = creds(tsvc);
        let e = within("get", secs(60), src.get())
            .await
            .expect_err("no token in this answer");
        let m = chain(&e);
        assert!(
            m.contains(want),
            "{status}: the error does not say {want}: {m}"
        );
        assert!(
            m.contains("auth.s76.test"),
            "{status}: no endpoint named: {m}"
        );
        assert!(!m.contains(SECRET), "{status}: the secret: {m}");
        assert!(!e.is_retryable(), "{status}: retryable? {m}");
        assert_eq!(seen.hits(), 1);
    }
}

/// `with_request_timeout`: "`Duration::ZERO` lets only an immediate answer through." An
/// in-process endpoint that answers at once gives a token; one that needs a moment times out
/// with kind `Timeout`.
#[tokio::test(start_paused = true)]
async fn s76_a_zero_request_timeout_lets_only_an_immediate_answer_through() {
    let (tsvc, _) = good_endpoint();
    let src = creds(tsvc).with_request_timeout(Duration::ZERO);
    let t = within("get", secs(30), src.get()).await;
    assert!(t.is_ok(), "an immediate answer refused: {:?}", t.err());
    let slow = tower::service_fn(|_req: Req| async {
        tokio::time::sleep(ms(5)).await;
        Ok::<_, BoxError>(Response::new(Full::from(tok(1, "3600"))))
    });
    let src = creds(slow).with_request_timeout(Duration::ZERO);
    let e = within("get", secs(30), src.get()).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{e}");
}

/// Two layers built from clones of one source ("Clones share one cache") cost one token request
/// between them, and a 401 through one of them replaces the token for the other as well.
#[tokio::test(start_paused = true)]
async fn s76_two_layers_over_clones_of_one_source_share_its_cache() {
    let (tsvc, seen) = good_endpoint();
    let src = creds(tsvc);
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let refuse_first = Arc::new(AtomicBool::new(true));
    let api = |log: Arc<Mutex<Vec<String>>>, refuse: Option<Arc<AtomicBool>>| {
        tower::service_fn(move |req: Req| {
            let a = req.headers()["authorization"].to_str().unwrap().to_string();
            log.lock().unwrap().push(a);
            let st = match &refuse {
                Some(r) if r.swap(false, Ordering::SeqCst) => 401,
                _ => 200,
            };
            async move { Ok::<_, BoxError>(Response::builder().status(st).body(()).unwrap()) }
        })
    };
    let a = AuthLayer::oauth2(src.clone()).layer(api(log.clone(), None));
    let b = AuthLayer::oauth2(src.clone()).layer(api(log.clone(), Some(refuse_first)));
    within("a", secs(30), a.clone().oneshot(get_req()))
        .await
        .unwrap();
    assert_eq!(seen.hits(), 1);
    within("b", secs(30), b.clone().oneshot(get_req()))
        .await
        .unwrap();
    assert_eq!(seen.hits(), 2, "b's 401 did not fetch a new token");
    within("a again", secs(30), a.oneshot(get_req()))
        .await
        .unwrap();
    assert_eq!(seen.hits(), 2);
    assert_eq!(
        log.lock().unwrap().clone(),
        [
            "Bearer TOK76-1",
            "Bearer TOK76-1",
            "Bearer TOK76-2",
            "Bearer TOK76-2"
        ]
    );
}

// =====================================================================================
// Over the wire: Buffer and ConcurrencyLimit(1), seeded cancellation
// =====================================================================================

type Hyper = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn hyper_client() -> Hyper {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn serve(app: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(l, app).await.unwrap();
    });
    format!("http://{addr}")
}

/// A tiny seeded generator (xorshift), so the drop points are the same every run.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A slow real token endpoint (40 ms) and a real API (5 ms) over hyper; the auth layer over
/// `Buffer` over `ConcurrencyLimit(1)`, and `Buffer` over `ConcurrencyLimit(1)` over the auth
/// layer, each driven by 30 kept clones (`ready().await?.call(req)`) dropped at seeded points.
/// Afterwards nothing is stuck: a last call goes through at once, one token request in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s76_wire_seeded_cancellation_under_buffer_and_limit_of_one() {
    let token_hits = Arc::new(AtomicUsize::new(0));
    let th = token_hits.clone();
    let token_app = axum::Router::new().route(
        "/token",
        axum::routing::post(move || {
            let th = th.clone();
            async move {
                let n = th.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(ms(40)).await;
                ([("content-type", "application/json")], tok(n, "3600"))
            }
        }),
    );
    let api_app = axum::Router::new().route(
        "/x",
        axum::routing::get(|h: http::HeaderMap| async move {
            tokio::time::sleep(ms(5)).await;
            if h.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer TOK76-1") {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            }
        }),
    );
    let token_base = serve(token_app).await;
    let api_base = serve(api_app).await;
    let http = hyper_client();

    for shape in ["auth over buffer/limit", "buffer/limit over auth"] {
        token_hits.store(0, Ordering::SeqCst);
        let src = ClientCredentials::new(
            http.clone(),
            &format!("{token_base}/token"),
            CLIENT_ID,
            SECRET,
        )
        .unwrap();
        let auth = AuthLayer::oauth2(src).with_token_timeout(secs(3));
        let svc: tower::util::BoxCloneSyncService<Req, Response<hyper::body::Incoming>, BoxError> =
            if shape == "auth over buffer/limit" {
                tower::util::BoxCloneSyncService::new(
                    ServiceBuilder::new()
                        .layer(auth)
                        .buffer(64)
                        .concurrency_limit(1)
                        .service(http.clone()),
                )
            } else {
                tower::util::BoxCloneSyncService::new(
                    ServiceBuilder::new()
                        .buffer(64)
                        .concurrency_limit(1)
                        .layer(auth)
                        .service(http.clone()),
                )
            };
        let mut rng = Rng(0x5eed_0076);
        let mut tasks = Vec::new();
        for _ in 0..30 {
            let mut s = svc.clone();
            let drop_at = ms(rng.below(120));
            let uri = format!("{api_base}/x");
            tasks.push(tokio::spawn(async move {
                let call = async {
                    let req = Request::get(uri.as_str()).body(Full::default()).unwrap();
                    s.ready().await?.call(req).await
                };
                match tokio::time::timeout(drop_at, call).await {
                    Ok(Ok(r)) => Some(r.status()),
                    Ok(Err(e)) => panic!("a call failed: {}", chain(&*e)),
                    Err(_) => None,
                }
            }));
        }
        let mut ok = 0;
        for t in tasks {
            if let Some(st) = within("a task", secs(10), t).await.unwrap() {
                assert_eq!(st, StatusCode::OK, "{shape}");
                ok += 1;
            }
        }
        let mut last = svc.clone();
        let req = Request::get(format!("{api_base}/x").as_str())
            .body(Full::default())
            .unwrap();
        let res = within("the last call", secs(2), async {
            last.ready().await?.call(req).await
        })
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{shape}");
        assert_eq!(
            token_hits.load(Ordering::SeqCst),
            1,
            "{shape}: token requests"
        );
        eprintln!("{shape}: {ok} of 30 finished before their drop point");
    }
}

// =====================================================================================
// The real oauth2-mock-server (interop/peers.js), when STURDY_S76_OAUTH_URL is set
// =====================================================================================

fn peer_url() -> Option<String> {
    match std::env::var("STURDY_S76_OAUTH_URL") {
        Ok(u) if !u.is_empty() => Some(u.trim_end_matches('/').to_string()),
        _ => None,
    }
}

fn jwt_claim(token: &str, claim: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let std_b64: String = payload
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    let v: serde_json::Value = serde_json::from_slice(&b64_decode(&std_b64)).ok()?;
    v.get(claim).cloned()
}

/// Against oauth2-mock-server (peers.js decodes Basic credentials as RFC 6749 says: form-encoded
/// id and secret): a client id with `:`, a space, `+` and non-ASCII gets a token whose
/// `client_id` claim is exactly that id, through both client auth methods; a `ttl2-` id's token
/// lives 2 s (refreshed at 1 s); a wrong secret is `invalid_client`, not retryable, and the
/// message shows neither secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s76_peer_odd_client_ids_lifetimes_and_a_wrong_secret() {
    let Some(oauth) = peer_url() else {
        eprintln!("s76_peer_odd_client_ids_lifetimes_and_a_wrong_secret: STURDY_S76_OAUTH_URL is unset; skipped");
        return;
    };
    let url = format!("{oauth}/token");
    let id = "ttl2-s76:odd id+é";
    for auth in [ClientAuth::SecretBasic, ClientAuth::SecretPost] {
        let lifetimes = Arc::new(Mutex::new(Vec::new()));
        let l = lifetimes.clone();
        let src = ClientCredentials::new(hyper_client(), &url, id, "interop-secret")
            .unwrap()
            .with_client_auth(auth)
            .on_event(move |e| {
                if let Event::TokenFetched { lifetime, .. } = e {
                    l.lock().unwrap().push(*lifetime);
                }
            });
        let t = within("get", secs(5), src.get())
            .await
            .unwrap_or_else(|e| panic!("{auth:?}: {}", chain(&e)));
        let claim = jwt_claim(t.secret().expose_secret(), "client_id");
        assert_eq!(
            claim,
            Some(serde_json::Value::String(id.into())),
            "{auth:?}: the server read another client id"
        );
        assert_eq!(lifetimes.lock().unwrap().clone(), vec![secs(2)], "{auth:?}");
    }
    let wrong = "wrong-S76-secret";
    let src = ClientCredentials::new(hyper_client(), &url, "s76-wrong", wrong).unwrap();
    let e = within("get", secs(5), src.get()).await.unwrap_err();
    let m = chain(&e);
    assert!(m.contains("invalid_client"), "{m}");
    assert!(!e.is_retryable(), "{m}");
    assert!(!m.contains(wrong) && !m.contains("interop-secret"), "{m}");
}

/// The crate docs: the source "turns token-endpoint errors (`invalid_client`, `invalid_scope`,
/// ...) into errors that say what to fix". Some servers answer a refusal with a 200 whose body is
/// RFC 6749 §5.2's error object; the error should name its code (and description) rather than
/// only "has no access_token".
#[tokio::test(start_paused = true)]
async fn s76_a_200_carrying_an_oauth_error_names_its_code() {
    let (tsvc, _) = endpoint(|_| {
        (
            200,
            json(),
            r#"{"error":"invalid_client","error_description":"unknown client"}"#.into(),
        )
    });
    let e = within("get", secs(60), creds(tsvc).get())
        .await
        .expect_err("no token in this answer");
    let m = chain(&e);
    assert!(
        m.contains("invalid_client"),
        "the error code is not named: {m}"
    );
    assert!(!e.is_retryable(), "{m}");
}

/// The cache: refreshed at `expiry - min(60 s, lifetime / 2)` "in the background while callers
/// go on with the still-valid token (a caller waits only when there is no valid token); one
/// request for N callers". A 100 s token is refreshed at 50 s; the refresh takes 70 s. Until
/// 100 s callers get the old token at once; past its expiry they never get the expired token:
/// they wait for the refresh under way (no second request) and get the new one when it lands.
#[tokio::test(start_paused = true)]
async fn s76_a_refresh_slower_than_the_tokens_rest_of_life_is_joined_not_doubled() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let slow = tower::service_fn(move |_req: Req| {
        let n = h.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n == 2 {
                tokio::time::sleep(secs(70)).await;
            }
            Ok::<_, BoxError>(Response::new(Full::from(tok(n, "100"))))
        }
    });
    let src = creds(slow).with_request_timeout(secs(300));
    let start = tokio::time::Instant::now();
    let t = within("first", secs(5), src.get()).await.unwrap();
    assert_eq!(t.secret().expose_secret(), "TOK76-1");
    tokio::time::advance(secs(50)).await;
    // Due for refresh: the old token at once, the refresh starts in the background.
    let t = within("at 50 s", ms(1), src.get()).await.unwrap();
    assert_eq!(t.secret().expose_secret(), "TOK76-1");
    tokio::task::yield_now().await;
    assert_eq!(hits.load(Ordering::SeqCst), 2, "no refresh started at 50 s");
    tokio::time::advance(secs(49)).await;
    let t = within("at 99 s", ms(1), src.get()).await.unwrap();
    assert_eq!(t.secret().expose_secret(), "TOK76-1");
    tokio::time::advance(secs(2)).await;
    // 101 s: TOK76-1 has expired, the refresh lands at 120 s.
    let mut waiters = Vec::new();
    for _ in 0..16 {
        let s = src.clone();
        waiters.push(tokio::spawn(async move {
            let t = s.get().await;
            (
                t.map(|t| t.secret().expose_secret().to_string()),
                tokio::time::Instant::now(),
            )
        }));
    }
    for w in waiters {
        let (t, at) = within("a waiter", secs(60), w).await.unwrap();
        let t = t.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t, "TOK76-2", "an expired token was handed out");
        assert_eq!(
            at - start,
            secs(120),
            "the waiters did not get the refresh as it landed"
        );
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "a second request beside the running refresh"
    );
}

/// A request body of known size within the replay limit whose stream fails while it is kept:
/// "an unreadable request body" is a `sturdy_core::Error` of kind `Body`, the request is not
/// sent, and the error says so (`Delivery::NotSent`).
#[tokio::test(start_paused = true)]
async fn s76_a_kept_body_that_fails_is_a_body_error_and_not_sent() {
    #[derive(Debug)]
    struct Broken;
    impl std::fmt::Display for Broken {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("s76 disk read failed")
        }
    }
    impl std::error::Error for Broken {}
    enum Failing {
        Broken(bool),
        Plain(Full<Bytes>),
    }
    impl From<Bytes> for Failing {
        fn from(b: Bytes) -> Self {
            Self::Plain(Full::new(b))
        }
    }
    impl Body for Failing {
        type Data = Bytes;
        type Error = Broken;
        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Broken>>> {
            match self.get_mut() {
                Self::Broken(first) if *first => {
                    *first = false;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"half")))))
                }
                Self::Broken(_) => Poll::Ready(Some(Err(Broken))),
                Self::Plain(f) => Pin::new(f).poll_frame(cx).map_err(|e| match e {}),
            }
        }
        fn size_hint(&self) -> SizeHint {
            match self {
                Self::Broken(_) => SizeHint::with_exact(8),
                Self::Plain(f) => f.size_hint(),
            }
        }
    }
    let (tsvc, _) = good_endpoint();
    let sent = Arc::new(AtomicUsize::new(0));
    let s = sent.clone();
    let api = tower::service_fn(move |_req: Request<Failing>| {
        s.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(Response::new(())) }
    });
    let svc = AuthLayer::oauth2(creds(tsvc)).layer(api);
    let req = Request::post("https://api.s76.test/upload")
        .body(Failing::Broken(true))
        .unwrap();
    let e = within("call", secs(5), svc.oneshot(req)).await.unwrap_err();
    let m = chain(&*e);
    assert_eq!(err_of(&e).kind(), &ErrorKind::Body, "{m}");
    assert_eq!(sent.load(Ordering::SeqCst), 0);
    assert_eq!(
        sturdy::core::classify::delivery(&*e),
        sturdy::core::Delivery::NotSent,
        "{m}"
    );
    assert!(
        m.contains("s76 disk read failed"),
        "the cause is not named: {m}"
    );
}

/// The crate docs: "a call that waits for a token holds its permit during the wait (bounded by
/// the token timeout); the token request itself does not go through the limit unless the token
/// client does." A token client that shares the API's `ConcurrencyLimit(1)` (a clone of the same
/// limited stack) cannot get the permit the waiting call holds: the call must fail at its token
/// timeout (not hang), not sent; the token request then gets the permit, and the next call
/// goes through with its token.
#[tokio::test(start_paused = true)]
async fn s76_a_token_client_sharing_the_limit_of_one_times_out_then_recovers() {
    let token_hits = Arc::new(AtomicUsize::new(0));
    let api_hits = Arc::new(AtomicUsize::new(0));
    let (th, ah) = (token_hits.clone(), api_hits.clone());
    let both = tower::service_fn(move |req: Req| {
        let is_token = req.uri().path() == "/oauth/token";
        let n = if is_token {
            th.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            ah.fetch_add(1, Ordering::SeqCst) + 1
        };
        async move {
            let body = if is_token {
                tok(n, "3600")
            } else {
                String::new()
            };
            Ok::<_, BoxError>(Response::new(Full::from(body)))
        }
    });
    let limited = ServiceBuilder::new().concurrency_limit(1).service(both);
    let src = creds(limited.clone());
    let mut svc = AuthLayer::oauth2(src)
        .with_token_timeout(ms(300))
        .layer(limited);
    let t0 = tokio::time::Instant::now();
    let r = within("first call", secs(10), async {
        svc.ready().await?.call(get_req()).await
    })
    .await;
    let e = r.expect_err("the token request could not have had the permit");
    assert_eq!(err_of(&e).kind(), &ErrorKind::Timeout, "{}", chain(&*e));
    assert_eq!(t0.elapsed(), ms(300));
    assert_eq!(
        sturdy::core::classify::delivery(&*e),
        sturdy::core::Delivery::NotSent
    );
    assert_eq!(api_hits.load(Ordering::SeqCst), 0);
    let res = within("second call", secs(10), async {
        svc.ready().await?.call(get_req()).await
    })
    .await
    .unwrap_or_else(|e| panic!("the limit is stuck: {}", chain(&*e)));
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(token_hits.load(Ordering::SeqCst), 1);
    assert_eq!(api_hits.load(Ordering::SeqCst), 1);
}

/// `api_key_query`: the key is "appended to the caller's query"; one of that name already there
/// is removed, "every other pair of the query is kept byte for byte". Across URI shapes (no
/// path, relative, an empty query, a trailing `&`, odd pairs) one key goes out, the layer's,
/// and the key's own odd bytes are form-encoded so that they decode back exactly.
#[tokio::test(start_paused = true)]
async fn s76_api_key_query_across_uri_shapes() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let api = tower::service_fn(move |req: Req| {
        s.lock().unwrap().push(req.uri().to_string());
        async { Ok::<_, BoxError>(Response::new(())) }
    });
    let key = "k&y=1+2 é%";
    let svc = AuthLayer::api_key_query("api_key", key).unwrap().layer(api);
    let cases = [
        ("https://api.s76.test", ""),
        ("https://api.s76.test/", ""),
        ("/rel", ""),
        ("/rel?", ""),
        ("/rel?a=1&", "a=1"),
        (
            "/rel?a=%zz&&b&=c&api_key=old&API_KEY=x",
            "a=%zz&&b&=c&API_KEY=x",
        ),
    ];
    for (uri, kept) in cases {
        within(
            "call",
            secs(5),
            svc.clone()
                .oneshot(Request::get(uri).body(Full::default()).unwrap()),
        )
        .await
        .unwrap();
        let sent = seen.lock().unwrap().pop().unwrap();
        let q = sent.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let keys: Vec<String> = q
            .split('&')
            .filter_map(|p| p.split_once('='))
            .filter(|(k, _)| form_decode(k) == "api_key")
            .map(|(_, v)| form_decode(v))
            .collect();
        assert_eq!(keys, [key], "{uri} -> {sent}");
        let rest: Vec<&str> = q
            .split('&')
            .filter(|p| !p.starts_with("api_key="))
            .collect();
        let rest = rest.join("&");
        assert!(
            rest.trim_matches('&') == kept.trim_matches('&'),
            "{uri} -> {sent}: the caller's pairs changed"
        );
    }
}

/// With static credentials a 401 is the API's answer: returned as is, one request, no token
/// machinery (no `TokenRejected` event).
#[tokio::test(start_paused = true)]
async fn s76_a_401_with_static_credentials_is_returned_as_is() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = tower::service_fn(move |_req: Req| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(Response::builder().status(401).body(()).unwrap()) }
    });
    let events = Arc::new(AtomicUsize::new(0));
    let e = events.clone();
    let svc = AuthLayer::bearer("static-76")
        .unwrap()
        .on_event(move |_| {
            e.fetch_add(1, Ordering::SeqCst);
        })
        .layer(api);
    let res = within("call", secs(5), svc.oneshot(get_req()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(events.load(Ordering::SeqCst), 0);
}
