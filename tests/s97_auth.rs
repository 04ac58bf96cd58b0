#![cfg(feature = "full")]
//! s97: an outside round on `sturdy-auth` (API keys, OAuth2 client credentials with a token
//! cache), on corners earlier rounds did not try: server words cut in the middle of an echoed
//! secret (`error`, `error_description`, a quoted `token_type` or `expires_in`), tiny positive
//! and odd-typed `expires_in`, `token_type` variants, a 429 with an absurd `Retry-After` from
//! the token endpoint, the replay after a 401 keeping the request's extensions (and its own
//! attempt timeout), a 401 that arrives while a background refresh is in flight, a kept service
//! made ready before its token expired, callers at the exact expiry under `Buffer` and
//! `ConcurrencyLimit(1)`, TRACE logs of all of it, and the real `oauth2-mock-server` (started
//! here on a free 127.0.0.1 port, with odd client secrets through both client auth methods).

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, ClientAuth, ClientCredentials, ExposeSecret};
use sturdy::core::{BoxError, CallOptions, ErrorKind};
use tower::{Service, ServiceBuilder, ServiceExt};

const TOKEN_URL: &str = "https://auth.s97.test/oauth/token?tenant_key=S97QUERYVALUEq8Wm";
const QUERY_VALUE: &str = "S97QUERYVALUEq8Wm";
const CLIENT_ID: &str = "c";
const SECRET: &str = "Zq9S97SECRETvalueXy7Kp2Lm4Nn6Bb8";

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

fn api_req() -> Req {
    Request::get("https://api.s97.test/orders")
        .body(Full::default())
        .unwrap()
}

fn err_of(e: &BoxError) -> &sturdy::core::Error {
    e.downcast_ref::<sturdy::core::Error>()
        .unwrap_or_else(|| panic!("not a sturdy_core::Error: {e:?}"))
}

/// Display of the error and of every source, then its Debug.
fn all_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(" | ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out.push_str(&format!(" || {e:?}"));
    out
}

/// Every window of `w` characters of `secret` that shows up in `text`.
fn leaked_windows(text: &str, secret: &str, w: usize) -> Vec<String> {
    let chars: Vec<char> = secret.chars().collect();
    let mut out = Vec::new();
    for i in 0..chars.len().saturating_sub(w - 1) {
        let win: String = chars[i..i + w].iter().collect();
        if text.contains(&win) {
            out.push(win);
        }
    }
    out
}

/// Counts and answers of an in-process token endpoint.
#[derive(Clone, Default)]
struct Seen {
    hits: Arc<AtomicUsize>,
}
impl Seen {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

type Answer = (u16, Vec<(&'static str, String)>, String, Duration);

/// An in-process token endpoint: `answer(n)` (n from 1) gives status, headers, body and delay.
fn endpoint(
    answer: impl Fn(usize) -> Answer + Send + Sync + 'static,
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
            let _ = req.into_body().collect().await;
            let (status, headers, body, delay) = answer(n);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
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

fn ok(body: String) -> Answer {
    (200, json(), body, Duration::ZERO)
}

fn tok(n: usize, expires_in: &str) -> String {
    format!(r#"{{"access_token":"TOK97-{n}","token_type":"Bearer","expires_in":{expires_in}}}"#)
}

fn creds<S>(svc: S) -> ClientCredentials
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    ClientCredentials::new(svc, TOKEN_URL, CLIENT_ID, SECRET).unwrap()
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl Buf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// TRACE logs of this thread into a buffer (the tests run on a current-thread runtime, so the
/// token tasks log here too).
fn capture() -> (Buf, tracing::subscriber::DefaultGuard) {
    let buf = Buf::default();
    let b = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || b.clone())
        .finish();
    (buf, tracing::subscriber::set_default(sub))
}

fn b64(input: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Server words cut in the middle of an echoed secret
// ---------------------------------------------------------------------------------------------

/// guides/auth.md: "The server's own words (its `error` and `error_description`, cut to 64 and
/// 200 characters) are quoted with the client secret and the token URL's user info and query
/// replaced by `[redacted]`". A secret that straddles the cut must not leave its first half
/// behind: every padding length around the cut, for the secret as sent, the Basic credentials
/// and the URL's query value, in the message, the sources, Debug and TRACE logs.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_server_words_cut_mid_secret_leak_no_part_of_it() {
    let (logs, _g) = capture();
    let basic = b64(format!("{CLIENT_ID}:{SECRET}").as_bytes());
    // Skip the part of the base64 that only covers "c:" (not secret).
    let basic_secret_part = &basic[4..];
    let mut cases: Vec<(String, String)> = Vec::new();
    for echo in [SECRET, basic.as_str(), QUERY_VALUE] {
        for pad in 160..=205 {
            let words = format!("{}{echo} tail", "x".repeat(pad));
            cases.push((
                format!("error_description pad {pad}"),
                format!(r#"{{"error":"invalid_request","error_description":"{words}"}}"#),
            ));
        }
        for pad in 24..=66 {
            let words = format!("{}{echo}", "e".repeat(pad));
            cases.push((
                format!("error pad {pad}"),
                format!(r#"{{"error":"{words}"}}"#),
            ));
        }
    }
    let mut bad = Vec::new();
    for (what, body) in cases {
        let (svc, _) = endpoint(move |_| (400, json(), body.clone(), Duration::ZERO));
        let source = creds(svc);
        let e = source.get().await.expect_err("a 400 is an error");
        let text = all_text(&e);
        let mut leaks = leaked_windows(&text, SECRET, 8);
        leaks.extend(leaked_windows(&text, basic_secret_part, 8));
        leaks.extend(leaked_windows(&text, QUERY_VALUE, 8));
        if !leaks.is_empty() {
            bad.push(format!("{what}: {leaks:?} in {text}"));
        }
    }
    let log = logs.text();
    let mut log_leaks = leaked_windows(&log, SECRET, 8);
    log_leaks.extend(leaked_windows(&log, basic_secret_part, 8));
    log_leaks.extend(leaked_windows(&log, QUERY_VALUE, 8));
    assert!(
        bad.is_empty() && log_leaks.is_empty(),
        "{} cases leak a part of a secret, first: {:?}; in logs: {log_leaks:?}",
        bad.len(),
        bad.first()
    );
}

/// guides/auth.md: a value of the token response quoted in a message is "without the client
/// secret or the token URL's secrets, cut to 64 characters"; the words of a refused `token_type`
/// or `expires_in` that echo the secret just before the cut must not show its first half.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_quoted_token_fields_cut_mid_secret_leak_no_part_of_it() {
    let (logs, _g) = capture();
    let mut bad = Vec::new();
    for field in ["token_type", "expires_in"] {
        for pad in 20..=66 {
            let v = format!("{}{SECRET}", "p".repeat(pad));
            let body = if field == "token_type" {
                format!(r#"{{"access_token":"TOK97-x","token_type":"{v}","expires_in":60}}"#)
            } else {
                format!(r#"{{"access_token":"TOK97-x","token_type":"Bearer","expires_in":"{v}"}}"#)
            };
            let (svc, _) = endpoint(move |_| ok(body.clone()));
            let source = creds(svc);
            let e = source
                .get()
                .await
                .expect_err("an odd token field is an error");
            let text = all_text(&e);
            let leaks = leaked_windows(&text, SECRET, 8);
            if !leaks.is_empty() || text.contains("TOK97-x") {
                bad.push(format!("{field} pad {pad}: {leaks:?} in {text}"));
            }
        }
    }
    let log = logs.text();
    let log_leaks = leaked_windows(&log, SECRET, 8);
    assert!(
        bad.is_empty() && log_leaks.is_empty() && !log.contains("TOK97-x"),
        "{} cases leak, first: {:?}; logs: {log_leaks:?}",
        bad.len(),
        bad.first()
    );
}

// ---------------------------------------------------------------------------------------------
// expires_in and token_type corners
// ---------------------------------------------------------------------------------------------

/// What `get` makes of one token response: `Ok(lifetime)` or `Err(kind, message)`, and how many
/// token requests five gets at the same instant cost.
async fn lifetime_of(body: &str) -> (Result<Option<Duration>, (ErrorKind, String)>, usize) {
    let body = body.to_string();
    let (svc, seen) = endpoint(move |_| ok(body.clone()));
    let source = creds(svc);
    let first = within("get", secs(5), source.get()).await;
    for _ in 0..4 {
        let _ = within("get", secs(5), source.get()).await;
    }
    let r = match first {
        Ok(t) => Ok(t
            .expires_at()
            .map(|at| at.saturating_duration_since(tokio::time::Instant::now()))),
        Err(e) => Err((e.kind().clone(), e.to_string())),
    };
    (r, seen.hits())
}

/// guides/auth.md: "`expires_in` missing => 1 h, zero or negative => a clear error" and
/// RELIABILITY.md: "zero, negative or not a number: an error, no refresh loop". A positive
/// `expires_in` too small for the clock (1e-12 s, 1e-9 s) must not hand out a token that is
/// already expired (one token request per call, a loop in all but name) nor hang.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_tiny_positive_expires_in_is_not_a_token_expired_at_birth() {
    let mut report = Vec::new();
    for v in ["1e-12", "1e-9", "0.0000001", "0.0001", "0.4", "0.999"] {
        let (r, hits) = lifetime_of(&tok(1, v)).await;
        let fine = match &r {
            Ok(Some(life)) => !life.is_zero() && hits == 1,
            Ok(None) => hits == 1,
            Err(_) => hits <= 5,
        };
        if !fine {
            report.push(format!(
                "expires_in {v}: {r:?}, {hits} token requests for 5 gets"
            ));
        }
    }
    assert!(report.is_empty(), "{report:#?}");
}

/// RELIABILITY.md: "a string of digits, `"3600"`, as some servers send, is read as the number";
/// "zero, negative or not a number: an error". Leading zeros are still digits; `"0"` and
/// `"000"` are zero; whitespace, signs, an empty string, full-width digits, `true`, an array
/// and an object are not strings of digits (or numbers).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_expires_in_odd_strings_and_json_types() {
    let mut report = Vec::new();
    // Read as the number.
    for (v, want) in [
        (r#""0003600""#, 3600u64),
        (r#""1""#, 1),
        (r#""86400""#, 86400),
        ("3.6e3", 3600),
        ("1E3", 1000),
        ("18446744073709551615", 86400),
        ("1.7976931348623157e308", 86400),
    ] {
        let (r, _) = lifetime_of(&tok(1, v)).await;
        if r != Ok(Some(secs(want))) {
            report.push(format!("{v}: want {want} s, got {r:?}"));
        }
    }
    // Errors that name the field.
    for v in [
        r#""0""#,
        r#""000""#,
        r#""""#,
        r#""-60""#,
        r#""３６００""#,
        "true",
        "[3600]",
        r#"{"s":3600}"#,
        "-0.0",
        "-1e-9",
        "-9223372036854775808",
        "-1e308",
    ] {
        let (r, hits) = lifetime_of(&tok(1, v)).await;
        match r {
            Err((_, msg)) if msg.contains("expires_in") => {
                if hits > 5 {
                    report.push(format!("{v}: {hits} requests for 5 gets"));
                }
            }
            other => report.push(format!(
                "{v}: want an error naming expires_in, got {other:?}"
            )),
        }
    }
    assert!(report.is_empty(), "{report:#?}");
}

/// The doc says nothing of a JSON `null`, a `+` sign or spaces around the digits: printed, not asserted (see the report).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_expires_in_null_and_plus_sign_observed() {
    for v in ["null", r#""+3600""#, r#"" 3600""#, r#""3600 ""#] {
        let (r, hits) = lifetime_of(&tok(1, v)).await;
        println!("expires_in {v}: {r:?} ({hits} requests)");
    }
}

/// The token type: `Bearer` in any case is a bearer token; another type (`DPoP`, `mac`, `N_A`,
/// an empty string, a number) is refused with an error that names `token_type`, shows not the
/// access token, and is not cached (the next `get` asks again).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_token_type_variants() {
    let (logs, _g) = capture();
    let mut report = Vec::new();
    for tt in [
        r#""DPoP""#,
        r#""mac""#,
        r#""N_A""#,
        r#""""#,
        "5",
        r#""Bearer x""#,
    ] {
        let body = format!(
            r#"{{"access_token":"TOK97-SECRETTOKEN","token_type":{tt},"expires_in":3600}}"#
        );
        let (svc, seen) = endpoint(move |_| ok(body.clone()));
        let source = creds(svc);
        match source.get().await {
            Ok(_) => report.push(format!("{tt}: accepted")),
            Err(e) => {
                let text = all_text(&e);
                if !text.contains("type") || text.contains("TOK97-SECRETTOKEN") {
                    report.push(format!("{tt}: {text}"));
                }
            }
        }
        tokio::time::advance(secs(120)).await;
        let _ = source.get().await;
        if seen.hits() != 2 {
            report.push(format!(
                "{tt}: {} requests for 2 gets 120 s apart",
                seen.hits()
            ));
        }
    }
    for tt in [r#""bearer""#, r#""BEARER""#, r#""bEaReR""#] {
        let body = format!(r#"{{"access_token":"TOK97-ok","token_type":{tt},"expires_in":3600}}"#);
        let (svc, _) = endpoint(move |_| ok(body.clone()));
        if let Err(e) = creds(svc).get().await {
            report.push(format!("{tt}: refused: {e}"));
        }
    }
    assert!(
        !logs.text().contains("TOK97-SECRETTOKEN"),
        "a token in the logs"
    );
    assert!(report.is_empty(), "{report:#?}");
}

/// The doc says nothing of a response without `token_type` (RFC 6749 requires it; many servers
/// omit it): printed.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_missing_token_type_observed() {
    let (svc, _) = endpoint(|_| ok(r#"{"access_token":"TOK97-n","expires_in":60}"#.into()));
    let r = creds(svc)
        .get()
        .await
        .map(|t| t.secret().expose_secret().to_string());
    println!("no token_type: {r:?}");
}

// ---------------------------------------------------------------------------------------------
// 429 / Retry-After from the token endpoint
// ---------------------------------------------------------------------------------------------

/// guides/auth.md: a failed refresh "backs off (1 s doubling to 60 s)"; "A 500, 502, 503, 504,
/// 429 ... from the token endpoint ... are retryable". A 429 with an absurd `Retry-After` must not
/// stop the source for longer than the 60 s cap, nor put an absurd wait in the error.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_token_endpoint_429_with_an_absurd_retry_after() {
    let (svc, seen) = endpoint(|n| {
        if n <= 1 {
            (
                429,
                vec![
                    ("content-type", "application/json".into()),
                    ("retry-after", "99999999999999999999".into()),
                ],
                r#"{"error":"slow_down"}"#.into(),
                Duration::ZERO,
            )
        } else {
            ok(tok(n, "3600"))
        }
    });
    let source = creds(svc);
    let e = source.get().await.expect_err("429");
    assert!(e.is_retryable(), "a 429 is retryable: {e}");
    let msg = e.to_string();
    assert!(
        !msg.contains("5124095") && !msg.contains("99999999999"),
        "absurd wait in the message: {msg}"
    );
    if let ErrorKind::RateLimited {
        retry_after: Some(d),
    } = e.kind()
    {
        assert!(*d <= secs(300), "retry_after {d:?} in the kind");
    }
    // Within the 60 s cap the endpoint is asked again.
    let start = tokio::time::Instant::now();
    let t = loop {
        match source.get().await {
            Ok(t) => break t,
            Err(_) if start.elapsed() < secs(61) => tokio::time::advance(ms(500)).await,
            Err(e) => panic!("still failing after {:?}: {e}", start.elapsed()),
        }
    };
    assert_eq!(t.secret().expose_secret(), "TOK97-2");
    assert_eq!(seen.hits(), 2);
}

/// The same through the layer under a `ClientBuilder`-like retry: a 429 with `Retry-After: 1`
/// from the token endpoint; a caller during the backoff gets the last error at once, not sent.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_token_endpoint_429_then_ok_through_the_layer() {
    let (svc, seen) = endpoint(|n| {
        if n == 1 {
            (
                429,
                vec![("retry-after", "1".into())],
                String::new(),
                Duration::ZERO,
            )
        } else {
            ok(tok(n, "3600"))
        }
    });
    let api = tower::service_fn(|req: Req| async move {
        let ok = req.headers()["authorization"] == "Bearer TOK97-2";
        Ok::<_, BoxError>(
            Response::builder()
                .status(if ok { 200 } else { 401 })
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    });
    let mut svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(creds(svc)))
        .service(api);
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(api_req())
        .await
        .unwrap_err();
    let se = err_of(&e);
    assert!(se.is_retryable());
    assert_eq!(
        sturdy::core::classify::delivery(&*e),
        sturdy::core::Delivery::NotSent
    );
    let t0 = tokio::time::Instant::now();
    let e2 = svc
        .ready()
        .await
        .unwrap()
        .call(api_req())
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO, "during the backoff: at once");
    assert_eq!(seen.hits(), 1, "{e2}");
    tokio::time::advance(ms(1001)).await;
    let r = svc.ready().await.unwrap().call(api_req()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(seen.hits(), 2);
}

// ---------------------------------------------------------------------------------------------
// The replay after a 401
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
struct Marker(u32);

/// guides/auth.md: "401 from the API: the token is invalidated, a new one fetched, the request
/// replayed once"; the README's stack puts the attempt timeout (which reads the request's
/// `CallOptions` from its extensions) under `Auth`. The replay is the request: it keeps its
/// extensions, the caller's `CallOptions` and any other.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_the_replay_keeps_the_requests_extensions() {
    let (tsvc, _) = endpoint(|n| ok(tok(n, "3600")));
    let seen_ext: Arc<Mutex<Vec<(Option<Marker>, Option<CallOptions>)>>> = Arc::default();
    let s = seen_ext.clone();
    let api = tower::service_fn(move |req: Req| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push((
                req.extensions().get::<Marker>().cloned(),
                CallOptions::of(&req).cloned(),
            ));
            let first = req.headers()["authorization"] == "Bearer TOK97-1";
            Ok::<_, Infallible>(
                Response::builder()
                    .status(if first { 401 } else { 200 })
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(creds(tsvc)))
        .service(api);
    let mut req = Request::post("https://api.s97.test/orders")
        .body(Full::from("{}"))
        .unwrap();
    let opts = CallOptions::new().with_attempt_timeout(ms(250));
    req.extensions_mut().insert(Marker(7));
    req.extensions_mut().insert(opts.clone());
    let r = svc.oneshot(req).await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = seen_ext.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], (Some(Marker(7)), Some(opts.clone())), "first send");
    assert_eq!(seen[1], (Some(Marker(7)), Some(opts)), "the replay");
}

/// guides/auth.md: "The wait for a token is part of an attempt: it ends at the shorter of the
/// token timeout and the attempt timeout (... or the request's
/// `CallOptions::with_attempt_timeout`)" and `with_token_timeout`: "each wait (before the first
/// send, and before the replay after a 401) is bounded by it". The wait before the replay, with
/// the request's own attempt timeout of 200 ms and a stalled token endpoint, ends by 200 ms.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_the_replay_wait_is_bounded_by_the_requests_attempt_timeout() {
    let (tsvc, _) = endpoint(|n| {
        if n == 1 {
            ok(tok(n, "3600"))
        } else {
            (200, json(), tok(n, "3600"), secs(20))
        }
    });
    let api = tower::service_fn(|_req: Req| async move {
        Ok::<_, Infallible>(
            Response::builder()
                .status(401)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    });
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(creds(tsvc)))
        .service(api);
    let mut req = api_req();
    req.extensions_mut()
        .insert(CallOptions::new().with_attempt_timeout(ms(200)));
    let t0 = tokio::time::Instant::now();
    let e = within("the call", secs(60), svc.oneshot(req))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert_eq!(*err_of(&e).kind(), ErrorKind::Timeout, "{e}");
    assert!(took <= ms(200), "the replay's token wait took {took:?}");
}

/// "one request for N callers": a 401 that comes while a background refresh is already under
/// way (the token is within its skew) joins that refresh rather than asking for another token.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_a_401_during_a_background_refresh_joins_it() {
    let (tsvc, seen) = endpoint(|n| {
        if n == 1 {
            ok(tok(n, "3600"))
        } else {
            (200, json(), tok(n, "3600"), secs(10))
        }
    });
    let revoked = Arc::new(AtomicBool::new(false));
    let sent: Arc<Mutex<Vec<String>>> = Arc::default();
    let (r2, s2) = (revoked.clone(), sent.clone());
    let api = tower::service_fn(move |req: Req| {
        let (revoked, sent) = (r2.clone(), s2.clone());
        async move {
            let auth = req.headers()["authorization"].to_str().unwrap().to_string();
            sent.lock().unwrap().push(auth.clone());
            let refused = auth == "Bearer TOK97-1" && revoked.load(Ordering::SeqCst);
            Ok::<_, Infallible>(
                Response::builder()
                    .status(if refused { 401 } else { 200 })
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(creds(tsvc)))
        .service(api);
    assert_eq!(svc.clone().oneshot(api_req()).await.unwrap().status(), 200);
    tokio::time::advance(secs(3545)).await;
    revoked.store(true, Ordering::SeqCst);
    let t0 = tokio::time::Instant::now();
    let r = within("the call", secs(60), svc.clone().oneshot(api_req()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(t0.elapsed() <= secs(10), "waited {:?}", t0.elapsed());
    assert_eq!(
        seen.hits(),
        2,
        "token requests: one at first, one refresh; sent {:?}",
        sent.lock().unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Kept services, Buffer and ConcurrencyLimit(1) at expiry
// ---------------------------------------------------------------------------------------------

fn counting_api() -> (
    impl Service<Req, Response = Res, Error = Infallible, Future: Send + 'static> + Clone + Send,
    Arc<Mutex<Vec<String>>>,
) {
    let sent: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = sent.clone();
    let api = tower::service_fn(move |req: Req| {
        let s = s.clone();
        async move {
            s.lock()
                .unwrap()
                .push(req.headers()["authorization"].to_str().unwrap().to_string());
            tokio::time::sleep(ms(1)).await;
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        }
    });
    (api, sent)
}

/// "current token per attempt": a kept service made ready (holding a `ConcurrencyLimit(1)`
/// permit) before the token expired and called after it expired sends a fresh token, not the
/// expired one.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_a_kept_service_made_ready_before_expiry_sends_a_fresh_token() {
    let (tsvc, seen) = endpoint(|n| ok(tok(n, "120")));
    let (api, sent) = counting_api();
    let mut svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(creds(tsvc).with_skew(Duration::ZERO)))
        .concurrency_limit(1)
        .service(api);
    svc.ready().await.unwrap().call(api_req()).await.unwrap();
    let ready = svc.ready().await.unwrap();
    tokio::time::advance(secs(121)).await;
    ready.call(api_req()).await.unwrap();
    assert_eq!(
        *sent.lock().unwrap(),
        vec!["Bearer TOK97-1".to_string(), "Bearer TOK97-2".to_string()]
    );
    assert_eq!(seen.hits(), 2);
}

/// "one request for N callers" at the exact instant of expiry, with no skew (no background
/// refresh): 64 tasks through `Buffer` over `Auth` over `ConcurrencyLimit(1)`, each with a kept
/// clone, all succeed, one token request, and nothing sent with the expired token.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_sixty_four_callers_at_the_instant_of_expiry_under_buffer_and_limit_one() {
    let (tsvc, seen) = endpoint(|n| (200, json(), tok(n, "600"), ms(50)));
    let (api, sent) = counting_api();
    let svc = ServiceBuilder::new()
        .buffer(8)
        .layer(AuthLayer::oauth2(creds(tsvc).with_skew(Duration::ZERO)))
        .concurrency_limit(1)
        .service(api);
    svc.clone().oneshot(api_req()).await.unwrap();
    tokio::time::advance(secs(600)).await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            s.ready().await?.call(api_req()).await.map(|r| r.status())
        }));
    }
    for t in tasks {
        assert_eq!(within("caller", secs(30), t).await.unwrap().unwrap(), 200);
    }
    let sent = sent.lock().unwrap().clone();
    assert_eq!(seen.hits(), 2, "token requests");
    assert_eq!(sent.len(), 65);
    assert!(sent[1..].iter().all(|a| a == "Bearer TOK97-2"), "{sent:?}");
}

// ---------------------------------------------------------------------------------------------
// More corners of the source
// ---------------------------------------------------------------------------------------------

/// A token client that panics mid-request: no caller is stranded (each waiter gets an answer,
/// well before the request timeout's 30 s + 10 s), and the next caller gets a token.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_a_token_client_that_panics_strands_no_caller() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let client = tower::service_fn(move |_req: Req| {
        let n = h.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(ms(10)).await;
            if n == 1 {
                panic!("s97 token client panics");
            }
            Ok::<_, BoxError>(Response::new(Full::from(tok(n, "3600"))))
        }
    });
    let source = creds(client);
    let mut waiters = Vec::new();
    for _ in 0..4 {
        let s = source.clone();
        waiters.push(tokio::spawn(async move { s.get().await }));
    }
    let t0 = tokio::time::Instant::now();
    let mut got = Vec::new();
    for w in waiters {
        let r = within("a waiter", secs(60), w).await.unwrap();
        got.push(r.map(|t| t.secret().expose_secret().to_string()));
    }
    assert!(
        t0.elapsed() < secs(30),
        "waiters held for {:?}: {got:?}",
        t0.elapsed()
    );
    // The waiters moved on to one new request, or got an error; either way the next caller
    // (after a backoff of at most 1 s) gets a token, and the requests stay few.
    tokio::time::advance(ms(1001)).await;
    let t = within("get", secs(60), source.get()).await.unwrap();
    assert!(t.secret().expose_secret().starts_with("TOK97-"));
    let n = hits.load(Ordering::SeqCst);
    assert!(n <= 3, "{n} token requests; waiters got {got:?}");
    println!("panicking token client: waiters got {got:?}; {n} requests");
}

/// guides/auth.md: the server's words are quoted "with the client secret ... replaced by
/// `[redacted]`" (the four-byte floor is for the URL's query values only): a two-byte client
/// secret echoed by the server is redacted too, as sent and inside the Basic credentials.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_a_short_client_secret_echoed_is_redacted() {
    let secret = "Q7";
    let basic = b64(format!("{CLIENT_ID}:{secret}").as_bytes());
    for auth in [ClientAuth::SecretBasic, ClientAuth::SecretPost] {
        let b = basic.clone();
        let (svc, _) = endpoint(move |_| {
            (
                401,
                json(),
                format!(
                    r#"{{"error":"invalid_client","error_description":"secret=Q7 basic {b} rejected"}}"#
                ),
                Duration::ZERO,
            )
        });
        let source = ClientCredentials::new(svc, TOKEN_URL, CLIENT_ID, secret)
            .unwrap()
            .with_client_auth(auth);
        let e = source.get().await.unwrap_err();
        let text = all_text(&e);
        assert!(
            !text.contains("Q7") && !text.contains(&basic),
            "{auth:?}: {text}"
        );
    }
}

/// `Auth`'s docs: "a clone starts without the readiness of the service it was cloned from, as
/// tower requires". A kept service made ready over `ConcurrencyLimit(1)` and then cloned: the
/// clone is not ready until the original's call is over, and both calls go through.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_a_clone_of_a_ready_kept_service_waits_for_its_own_permit() {
    let (tsvc, seen) = endpoint(|n| (200, json(), tok(n, "3600"), ms(20)));
    let (api, sent) = counting_api();
    let mut a = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(creds(tsvc)))
        .concurrency_limit(1)
        .service(api);
    a.ready().await.unwrap();
    let mut b = a.clone();
    {
        let mut ready_b = tokio_test::task::spawn(b.ready());
        assert!(ready_b.poll().is_pending(), "the clone got a second permit");
    }
    let fut = a.call(api_req());
    assert_eq!(fut.await.unwrap().status(), 200);
    let r = within("clone", secs(5), async {
        b.ready().await.unwrap().call(api_req()).await
    })
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(seen.hits(), 1);
    assert_eq!(sent.lock().unwrap().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// The real oauth2-mock-server, started here on a free 127.0.0.1 port
// ---------------------------------------------------------------------------------------------

const NODE_SCRIPT: &str = r#"
const { OAuth2Server } = require('oauth2-mock-server');
const SECRET = process.env.S97_SECRET;
function clientOf(req) {
  const auth = req.headers.authorization || '';
  if (auth.toLowerCase().startsWith('basic ')) {
    const d = Buffer.from(auth.slice(6).trim(), 'base64').toString('utf8');
    const i = d.indexOf(':');
    const dec = (s) => decodeURIComponent(s.replace(/\+/g, ' '));
    return { id: dec(d.slice(0, i)), secret: dec(d.slice(i + 1)), how: 'basic' };
  }
  const b = req.body || {};
  return { id: b.client_id, secret: b.client_secret, how: 'post' };
}
(async () => {
  const server = new OAuth2Server();
  await server.issuer.keys.generate('RS256');
  server.service.on('beforeTokenSigning', (token, req) => {
    const c = clientOf(req);
    token.payload.client_id = c.id;
    token.payload.how = c.how;
    token.payload.jti = Date.now() + '-' + Math.random().toString(16).slice(2);
    const ttl = /^ttl(\d+)-/.exec(c.id || '');
    if (ttl) token.payload.exp = token.payload.iat + Number(ttl[1]);
  });
  server.service.on('beforeResponse', (response, req) => {
    const c = clientOf(req);
    if (c.secret !== SECRET) {
      response.statusCode = 401;
      response.body = { error: 'invalid_client', error_description: 'bad secret: ' + c.secret };
      return;
    }
    const ttl = /^ttl(\d+)-/.exec(c.id || '');
    if (ttl) response.body.expires_in = Number(ttl[1]);
  });
  await server.start(0, '127.0.0.1');
  console.log(server.address().port);
})().catch((e) => { console.error(e); process.exit(1); });
setInterval(() => {}, 1000);
"#;

const ODD_SECRET: &str = "p@ss:w/rd+&=%25 é💥\"\\x";

/// The node process, killed when dropped.
struct Node {
    child: std::process::Child,
    url: String,
}
impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_oauth_server() -> Option<Node> {
    use std::io::BufRead;
    let dir = std::env::var("STURDY_INTEROP_NODE_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/interop").to_string());
    if !std::path::Path::new(&dir)
        .join("node_modules/oauth2-mock-server")
        .exists()
    {
        println!("skip: no oauth2-mock-server in {dir}/node_modules");
        return None;
    }
    let mut child = std::process::Command::new("node")
        .arg("-e")
        .arg(NODE_SCRIPT)
        .current_dir(&dir)
        .env("S97_SECRET", ODD_SECRET)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .ok()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().expect("the server's port");
    Some(Node {
        child,
        url: format!("http://127.0.0.1:{port}/token"),
    })
}

type Hyper = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn hyper_client() -> Hyper {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

fn b64url_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| *c != b'=') {
        acc = (acc << 6) | A.iter().position(|a| *a == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

fn claims(jwt: &str) -> serde_json::Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&b64url_decode(payload)).unwrap()
}

/// Against the real server: a client id and secret full of form and Basic delimiters (`:`, `+`,
/// `&`, `=`, `%25`, a space, non-ASCII, `"` and `\`) arrive as they are through both client
/// auth methods (RFC 6749 §2.3.1); a wrong secret is `invalid_client`, not retryable, and the
/// server's echo of the wrong secret is not in the message or the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s97_real_server_odd_secrets_through_basic_and_post() {
    let Some(node) = start_oauth_server() else {
        return;
    };
    let (logs, _g) = capture();
    let id = "s97 id:with+odd&chars=é";
    for auth in [ClientAuth::SecretBasic, ClientAuth::SecretPost] {
        let source = ClientCredentials::new(hyper_client(), node.url.as_str(), id, ODD_SECRET)
            .unwrap()
            .with_client_auth(auth);
        let t = within("token", secs(10), source.get()).await.unwrap();
        let c = claims(t.secret().expose_secret());
        assert_eq!(c["client_id"], id, "{auth:?}");
        let want = if auth == ClientAuth::SecretBasic {
            "basic"
        } else {
            "post"
        };
        assert_eq!(c["how"], want);
        let life = t.expires_at().unwrap() - tokio::time::Instant::now();
        assert!(life > secs(3500) && life <= secs(3600), "{life:?}");

        let wrong = format!("{ODD_SECRET}-wrong");
        let source = ClientCredentials::new(hyper_client(), node.url.as_str(), id, wrong.as_str())
            .unwrap()
            .with_client_auth(auth);
        let e = within("token", secs(10), source.get()).await.unwrap_err();
        assert_eq!(*e.kind(), ErrorKind::Auth, "{e}");
        assert!(!e.is_retryable());
        let text = all_text(&e);
        assert!(text.contains("invalid_client"), "{text}");
        assert!(!text.contains("p@ss") && !text.contains("-wrong"), "{text}");
    }
    let log = logs.text();
    assert!(
        !log.contains("p@ss") && !log.contains("rd+&"),
        "a secret in the logs"
    );
}

/// Against the real server, 1-second tokens: three waves of 32 callers through `Buffer` over
/// `Auth` over `ConcurrencyLimit(1)`, 600 ms apart, all succeed with a token that had not
/// expired when sent, and the waves cost one token request per refresh, not
/// one per caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s97_real_server_one_second_tokens_waves_under_buffer_and_limit_one() {
    let Some(node) = start_oauth_server() else {
        return;
    };
    let token_requests = Arc::new(AtomicUsize::new(0));
    let tr = token_requests.clone();
    let http = hyper_client();
    let counted = tower::service_fn(move |req: Req| {
        tr.fetch_add(1, Ordering::SeqCst);
        http.clone().oneshot(req)
    });
    let source = ClientCredentials::new(counted, node.url.as_str(), "ttl1-s97", ODD_SECRET)
        .unwrap()
        .with_request_timeout(secs(2));
    // A JWT's `exp` is whole seconds (`iat` cut down), so it cannot tell a token's age to the
    // millisecond: the API notes when it first saw each token instead, and counts sends more
    // than the token's 1 s lifetime after that (surely after the client's own expiry).
    let expired_sends = Arc::new(AtomicUsize::new(0));
    let first_seen: Arc<Mutex<std::collections::HashMap<String, tokio::time::Instant>>> =
        Arc::default();
    let (es, fs) = (expired_sends.clone(), first_seen.clone());
    let api = tower::service_fn(move |req: Req| {
        let (es, fs) = (es.clone(), fs.clone());
        async move {
            let auth = req.headers()["authorization"].to_str().unwrap().to_string();
            let auth_tail = auth[auth.len() - 12..].to_string();
            let first = *fs
                .lock()
                .unwrap()
                .entry(auth)
                .or_insert_with(tokio::time::Instant::now);
            if first.elapsed() > secs(1) {
                es.fetch_add(1, Ordering::SeqCst);
                eprintln!(
                    "sent {:?} after the API first saw it (token ...{})",
                    first.elapsed(),
                    &auth_tail
                );
            }
            tokio::time::sleep(ms(1)).await;
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        }
    });
    let svc = ServiceBuilder::new()
        .buffer(64)
        .layer(AuthLayer::oauth2(source).with_token_timeout(secs(3)))
        .concurrency_limit(1)
        .service(api);
    for wave in 0..3 {
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let mut s = svc.clone();
            tasks.push(tokio::spawn(async move {
                s.ready().await?.call(api_req()).await.map(|r| r.status())
            }));
        }
        for t in tasks {
            let r = within("caller", secs(10), t).await.unwrap();
            assert_eq!(r.unwrap(), 200, "wave {wave}");
        }
        tokio::time::sleep(ms(600)).await;
    }
    let n = token_requests.load(Ordering::SeqCst);
    eprintln!(
        "{n} token requests; {} tokens seen",
        first_seen.lock().unwrap().len()
    );
    assert!((2..=6).contains(&n), "{n} token requests for 96 calls");
    assert_eq!(
        expired_sends.load(Ordering::SeqCst),
        0,
        "expired tokens sent"
    );
}

/// guides/auth.md: "The token request goes through the client you give: any `Clone + Send`
/// service of `Request<Full<Bytes>>`, such as a hyper-util client or a boxed stack
/// (`tower::util::BoxCloneSyncService`) with its own retries"; `ClientCredentials::new`: "which
/// gives token requests their own retries". A token client of sturdy's own `RetryLayer` over a
/// token endpoint that answers 503 once retries the token request.
#[tokio::test(flavor = "current_thread", start_paused = true)]
#[ignore = "DOCUMENTED since: auth.md and ClientCredentials::new say RetryLayer alone does not retry the token POST (no idempotency key); ClientBuilder does"]
async fn s97_a_token_client_with_sturdys_retry_layer_retries_a_503() {
    let (tsvc, seen) = endpoint(|n| {
        if n == 1 {
            (
                503,
                json(),
                r#"{"error":"temporarily_unavailable"}"#.into(),
                Duration::ZERO,
            )
        } else {
            ok(tok(n, "3600"))
        }
    });
    let client = tower::util::BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(sturdy::retry::RetryLayer::new().with_seed(97))
            .service(tsvc),
    );
    let source = creds(client);
    let r = within("get", secs(60), source.get()).await;
    let n = seen.hits();
    match r {
        Ok(t) => {
            assert_eq!(t.secret().expose_secret(), "TOK97-2");
            assert_eq!(n, 2);
        }
        Err(e) => panic!("the token request was not retried ({n} sent): {e}"),
    }
}

/// guides/auth.md: "Wherever a concurrency limit sits, a call waiting for a token holds its
/// permit during the wait, bounded by the token timeout." Under `LoadShed`, callers that arrive
/// while one call waits for a stalled token endpoint are shed at once (not queued), and once the
/// wait ends at the token timeout the permit is free for the next caller.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_load_shed_over_a_call_waiting_for_a_token() {
    let (tsvc, seen) = endpoint(|n| {
        if n == 1 {
            (200, json(), tok(n, "3600"), secs(3600))
        } else {
            ok(tok(n, "3600"))
        }
    });
    let (api, sent) = counting_api();
    let svc = ServiceBuilder::new()
        .load_shed()
        .layer(
            AuthLayer::oauth2(creds(tsvc).with_request_timeout(secs(2)))
                .with_token_timeout(secs(1)),
        )
        .concurrency_limit(1)
        .service(api);
    let waiting = tokio::spawn(svc.clone().oneshot(api_req()));
    tokio::task::yield_now().await;
    tokio::time::advance(ms(10)).await;
    let shed = svc.clone().oneshot(api_req()).await.unwrap_err();
    assert!(
        shed.is::<tower::load_shed::error::Overloaded>(),
        "not shed: {shed}"
    );
    let e = within("the waiting call", secs(5), waiting)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(*err_of(&e).kind(), ErrorKind::Timeout, "{e}");
    // The token request times out at 2 s; the backoff (1 s) ends at 3 s.
    for _ in 0..30 {
        tokio::time::advance(ms(100)).await;
    }
    let r = within("the next call", secs(5), svc.clone().oneshot(api_req()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(*sent.lock().unwrap(), vec!["Bearer TOK97-2".to_string()]);
    assert_eq!(seen.hits(), 2);
}

/// A large but valid token (a 60 KB JWT, within the 64 KiB token response) is sent as it came;
/// `Debug` of the layer, the service and the source after use shows neither it nor the secret.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_a_sixty_kb_token_is_sent_and_never_in_debug() {
    let big: String = "eyJ".to_string() + &"A".repeat(60_000) + "Zend";
    let b2 = big.clone();
    let (tsvc, _) = endpoint(move |_| {
        ok(format!(
            r#"{{"access_token":"{b2}","token_type":"Bearer","expires_in":3600}}"#
        ))
    });
    let (api, sent) = counting_api();
    let source = creds(tsvc);
    let layer = AuthLayer::oauth2(source.clone());
    let mut svc = ServiceBuilder::new().layer(layer.clone()).service(api);
    let r = svc.ready().await.unwrap().call(api_req()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sent.lock().unwrap()[0], format!("Bearer {big}"));
    let dbg = format!("{layer:?} {source:?} {:?}", source.get().await.unwrap());
    assert!(
        !dbg.contains("AAAAAAAAAA") && !dbg.contains(SECRET),
        "{dbg}"
    );
    let dbg_svc = format!("{:?}", ServiceBuilder::new().layer(layer).service(()));
    assert!(!dbg_svc.contains("AAAAAAAAAA") && !dbg_svc.contains(SECRET));
}

/// lib.rs: "a caller with no valid token during the backoff gets the last error at once, saying
/// when the endpoint is asked again". After a 429, the message a caller gets during the backoff
/// says when, and that time is when the endpoint is in fact asked again.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_the_backoff_error_says_when_the_endpoint_is_asked_again() {
    let (tsvc, seen) = endpoint(|n| {
        if n <= 3 {
            (
                429,
                vec![("retry-after", "1".into())],
                String::new(),
                Duration::ZERO,
            )
        } else {
            ok(tok(n, "3600"))
        }
    });
    let source = creds(tsvc);
    let mut said = Vec::new();
    let start = tokio::time::Instant::now();
    let mut asked_at = Vec::new();
    let mut last_hits = 0;
    while start.elapsed() < secs(20) {
        match source.get().await {
            Ok(_) => break,
            Err(e) => {
                if seen.hits() != last_hits {
                    last_hits = seen.hits();
                    asked_at.push(start.elapsed());
                } else {
                    said.push(e.to_string());
                }
            }
        }
        tokio::time::advance(ms(100)).await;
    }
    let msg = said.first().cloned().unwrap_or_default();
    println!("asked at {asked_at:?}; during the backoff: {msg}");
    assert!(
        msg.contains("again") || msg.contains(" in "),
        "the backoff error does not say when: {msg}"
    );
    // 1 s, then 2 s, then 4 s between the requests (doubling from 1 s).
    assert_eq!(asked_at.len(), 3, "{asked_at:?}");
    assert_eq!(asked_at[1] - asked_at[0], secs(1), "{asked_at:?}");
    assert_eq!(asked_at[2] - asked_at[1], secs(2), "{asked_at:?}");
    assert_eq!(seen.hits(), 4);
}

/// "A token source shared by several layers and runtimes": two OS threads, each with a runtime
/// and a layer of its own over clones of one source, 1-second tokens from an endpoint that
/// takes 30 ms; every call succeeds, and the two share the refreshes (a handful of token
/// requests, not one per call or per runtime per refresh). Then the first runtime is shut down
/// in the middle of a token request, and the second still gets tokens.
#[test]
fn s97_one_source_two_runtimes_real_time_with_one_shut_down_mid_request() {
    let (tsvc, seen) = endpoint(|n| (200, json(), tok(n, "1"), ms(30)));
    let source = creds(tsvc);
    let layer = AuthLayer::oauth2(source.clone()).with_token_timeout(secs(2));
    let failures = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let run = |layer: AuthLayer, for_ms: u64| {
        let (failures, calls) = (failures.clone(), calls.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (api, _) = counting_api();
                let mut svc = ServiceBuilder::new().layer(layer).service(api);
                let end = tokio::time::Instant::now() + ms(for_ms);
                while tokio::time::Instant::now() < end {
                    calls.fetch_add(1, Ordering::SeqCst);
                    match svc.ready().await.unwrap().call(api_req()).await {
                        Ok(r) if r.status() == 200 => {}
                        _ => {
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    tokio::time::sleep(ms(15)).await;
                }
            });
        })
    };
    let a = run(layer.clone(), 1300);
    let b = run(layer, 1300);
    a.join().unwrap();
    b.join().unwrap();
    let n = seen.hits();
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    assert!(calls.load(Ordering::SeqCst) > 80);
    assert!(
        (2..=5).contains(&n),
        "{n} token requests in 1.3 s of 1 s tokens"
    );

    // A runtime shut down while its request is in flight: start a request there (no valid token
    // after 1.1 s), drop the runtime 10 ms in, and get a token from another runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { tokio::time::sleep(ms(1100)).await });
    let before = seen.hits();
    let s2 = source.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let _ = tokio::time::timeout(ms(10), s2.get()).await;
        });
        drop(rt);
    })
    .join()
    .unwrap();
    assert_eq!(seen.hits(), before + 1, "the request started there");
    let t = rt
        .block_on(async { tokio::time::timeout(secs(2), source.get()).await })
        .expect("no token within 2 s after the other runtime shut down")
        .unwrap();
    assert!(t.expires_at().unwrap() > tokio::time::Instant::now());
}

/// guides/auth.md: "a body whose size is known and within `.with_replay_limit(bytes)` \[1 MiB\]
/// is kept for the replay; a larger one ... is sent once and its 401 returned as is". With a
/// limit of 0, an empty body (known size 0) is within it and replayed; a
/// 1-byte body is sent once and its 401 returned.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_a_zero_replay_limit_still_replays_an_empty_body() {
    async fn run(body: Full<Bytes>) -> (u16, usize) {
        let (tsvc, _) = endpoint(|n| ok(tok(n, "3600")));
        let sends = Arc::new(AtomicUsize::new(0));
        let s = sends.clone();
        let api = tower::service_fn(move |req: Req| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                let first = req.headers()["authorization"] == "Bearer TOK97-1";
                let _ = req.into_body().collect().await;
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(if first { 401 } else { 200 })
                        .body(Full::<Bytes>::default())
                        .unwrap(),
                )
            }
        });
        let svc = ServiceBuilder::new()
            .layer(AuthLayer::oauth2(creds(tsvc)).with_replay_limit(0))
            .service(api);
        let req = Request::post("https://api.s97.test/orders")
            .body(body)
            .unwrap();
        let r = svc.oneshot(req).await.unwrap();
        (r.status().as_u16(), sends.load(Ordering::SeqCst))
    }
    assert_eq!(run(Full::<Bytes>::default()).await, (200, 2), "empty Full");
    assert_eq!(run(Full::from("x")).await, (401, 1), "one byte");
}

/// "cancel at every await": a call through `Buffer` over `Auth` over `ConcurrencyLimit(1)`
/// whose first token the API refuses (401, new token, replay) is dropped after 0, 1, 2, ... ms
/// of its life, at every step of that path (token wait, first send, 401, the replay's token
/// wait, its readiness, its send). After each drop, a fresh call with a kept service gets
/// through within the token timeout, nothing is held, and the token requests stay within one
/// per refusal.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_a_401_path_dropped_at_every_millisecond_leaves_nothing_held() {
    for drop_at in 0..40u64 {
        let (tsvc, seen) = endpoint(|n| (200, json(), tok(n, "3600"), ms(7)));
        let api = tower::service_fn(move |req: Req| async move {
            tokio::time::sleep(ms(5)).await;
            let first = req.headers()["authorization"] == "Bearer TOK97-1";
            Ok::<_, Infallible>(
                Response::builder()
                    .status(if first { 401 } else { 200 })
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        });
        let svc = ServiceBuilder::new()
            .buffer(4)
            .layer(AuthLayer::oauth2(creds(tsvc)).with_token_timeout(secs(1)))
            .concurrency_limit(1)
            .service(api);
        let call = tokio::spawn(svc.clone().oneshot(api_req()));
        tokio::task::yield_now().await;
        for _ in 0..drop_at {
            tokio::time::advance(ms(1)).await;
        }
        call.abort();
        let _ = call.await;
        let mut kept = svc.clone();
        let r = within(
            &format!("the call after a drop at {drop_at} ms"),
            secs(5),
            async { kept.ready().await?.call(api_req()).await },
        )
        .await
        .unwrap_or_else(|e| panic!("drop at {drop_at} ms: {e}"));
        assert_eq!(r.status(), 200, "drop at {drop_at} ms");
        assert!(
            seen.hits() <= 2,
            "drop at {drop_at} ms: {} token requests",
            seen.hits()
        );
    }
}

/// guides/auth.md: past the wait "the call fails with a `sturdy_core::Error` of kind `Timeout`
/// (retryable) naming the token endpoint, e.g. `no access token from the token endpoint
/// https://auth.example.com/oauth/token within 30s; the request was not sent. ...`", and the
/// wait "ends at the shorter of the token timeout and the attempt timeout". A wait cut by the
/// request's own attempt timeout of 250 ms says 250ms (not the token timeout's 30s), names the
/// endpoint without its query, and says not sent; a wait cut by the layer's attempt timeout
/// likewise.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_a_token_wait_cut_by_an_attempt_timeout_names_that_time() {
    for (layer_attempt, request_attempt) in [(None, Some(ms(250))), (Some(ms(250)), None)] {
        let (tsvc, _) = endpoint(|n| (200, json(), tok(n, "3600"), secs(3600)));
        let (api, sent) = counting_api();
        let mut layer = AuthLayer::oauth2(creds(tsvc));
        if let Some(d) = layer_attempt {
            layer = layer.with_attempt_timeout(d);
        }
        let svc = ServiceBuilder::new().layer(layer).service(api);
        let mut req = api_req();
        if let Some(d) = request_attempt {
            req.extensions_mut()
                .insert(CallOptions::new().with_attempt_timeout(d));
        }
        let t0 = tokio::time::Instant::now();
        let e = within("call", secs(60), svc.oneshot(req))
            .await
            .unwrap_err();
        assert_eq!(t0.elapsed(), ms(250));
        let se = err_of(&e);
        assert_eq!(*se.kind(), ErrorKind::Timeout);
        let msg = se.to_string();
        assert!(
            msg.contains("https://auth.s97.test/oauth/token")
                && !msg.contains(QUERY_VALUE)
                && msg.contains("250ms")
                && !msg.contains("30s")
                && msg.contains("not sent"),
            "{msg}"
        );
        assert_eq!(
            sturdy::core::classify::delivery(&*e),
            sturdy::core::Delivery::NotSent
        );
        assert!(sent.lock().unwrap().is_empty());
    }
}

/// README: the retry layer honours `Retry-After` ("never sooner"); guides/auth.md: a 429 from
/// the token endpoint is retryable, and the source backs off 1 s after a failure (a caller in
/// the backoff gets the last error at once). In a `ClientBuilder` stack, a token endpoint that
/// answers one 429 with `Retry-After: 1` and then tokens: the GET goes through, with two token
/// requests and one API request.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_client_builder_over_a_token_endpoint_429_with_retry_after_one() {
    let (tsvc, seen) = endpoint(|n| {
        if n == 1 {
            (
                429,
                vec![("retry-after", "1".into())],
                String::new(),
                Duration::ZERO,
            )
        } else {
            ok(tok(n, "3600"))
        }
    });
    let (api, sent) = counting_api();
    let api = tower::util::BoxCloneSyncService::new(api.map_err(BoxError::from));
    let client = sturdy::ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(97))
        .with_auth(AuthLayer::oauth2(creds(tsvc)))
        .build(api);
    let t0 = tokio::time::Instant::now();
    let r = within("call", secs(120), client.oneshot(api_req())).await;
    let took = t0.elapsed();
    match r {
        Ok(r) => assert_eq!(r.status(), 200),
        Err(e) => panic!(
            "failed after {took:?} with {} token requests: {}",
            seen.hits(),
            all_text(&*e)
        ),
    }
    assert_eq!(seen.hits(), 2);
    assert_eq!(sent.lock().unwrap().len(), 1);
    assert!(took >= secs(1), "{took:?}");
}

/// guides/auth.md: "A 503 from the token endpoint keeps the kind `Server(503)`, so it stays
/// retryable"; the source backs off 1 s after it, and "a caller with no valid token during the
/// backoff gets the last error at once". In a `ClientBuilder` stack (4 attempts by default), a
/// token endpoint that answers one 503 and then tokens: the retries are meant to get the call
/// through, so at least one of them must come after the 1 s backoff.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_client_builder_over_a_token_endpoint_503_once() {
    let (tsvc, seen) = endpoint(|n| {
        if n == 1 {
            (503, vec![], String::new(), Duration::ZERO)
        } else {
            ok(tok(n, "3600"))
        }
    });
    let (api, sent) = counting_api();
    let api = tower::util::BoxCloneSyncService::new(api.map_err(BoxError::from));
    let client = sturdy::ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(97))
        .with_auth(AuthLayer::oauth2(creds(tsvc)))
        .build(api);
    let t0 = tokio::time::Instant::now();
    let r = within("call", secs(120), client.oneshot(api_req())).await;
    let took = t0.elapsed();
    match r {
        Ok(r) => assert_eq!(r.status(), 200),
        Err(e) => panic!(
            "failed after {took:?} with {} token requests: {}",
            seen.hits(),
            all_text(&*e)
        ),
    }
    assert_eq!(seen.hits(), 2);
    assert_eq!(sent.lock().unwrap().len(), 1);
}

/// `AuthLayer::on_event`: "replaces an earlier callback" and `with_token_timeout`: "Setting it
/// is cheap (the layer's shared state is not copied)". A clone of a layer given a callback of
/// its own leaves the original's callback as it was: each layer reports its own 401s to its own
/// callback. Likewise `ClientCredentials::on_event` on a clone leaves the original's callback.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s97_a_callback_set_on_a_clone_does_not_replace_the_originals() {
    let (tsvc, _) = endpoint(|n| ok(tok(n, "3600")));
    let seen_a = Arc::new(AtomicUsize::new(0));
    let seen_b = Arc::new(AtomicUsize::new(0));
    let (a2, b2) = (seen_a.clone(), seen_b.clone());
    let layer_a = AuthLayer::oauth2(creds(tsvc)).on_event(move |e| {
        if matches!(e, sturdy::core::events::Event::TokenRejected { .. }) {
            a2.fetch_add(1, Ordering::SeqCst);
        }
    });
    let layer_b = layer_a.clone().on_event(move |e| {
        if matches!(e, sturdy::core::events::Event::TokenRejected { .. }) {
            b2.fetch_add(1, Ordering::SeqCst);
        }
    });
    let api = tower::service_fn(|req: Req| async move {
        let first = req.headers()["authorization"] == "Bearer TOK97-1";
        Ok::<_, Infallible>(
            Response::builder()
                .status(if first { 401 } else { 200 })
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    });
    let svc_a = ServiceBuilder::new().layer(layer_a).service(api);
    assert_eq!(svc_a.oneshot(api_req()).await.unwrap().status(), 200);
    assert_eq!(
        (seen_a.load(Ordering::SeqCst), seen_b.load(Ordering::SeqCst)),
        (1, 0),
        "the 401 of layer A went to the callback of layer B"
    );
    drop(layer_b);

    // The source: a clone's callback does not replace the original's.
    let (tsvc, _) = endpoint(|n| ok(tok(n, "3600")));
    let fetched_a = Arc::new(AtomicUsize::new(0));
    let fetched_b = Arc::new(AtomicUsize::new(0));
    let (fa, fb) = (fetched_a.clone(), fetched_b.clone());
    let src_a = creds(tsvc).on_event(move |e| {
        if matches!(e, sturdy::core::events::Event::TokenFetched { .. }) {
            fa.fetch_add(1, Ordering::SeqCst);
        }
    });
    let _src_b = src_a.clone().on_event(move |e| {
        if matches!(e, sturdy::core::events::Event::TokenFetched { .. }) {
            fb.fetch_add(1, Ordering::SeqCst);
        }
    });
    src_a.get().await.unwrap();
    assert_eq!(
        (
            fetched_a.load(Ordering::SeqCst),
            fetched_b.load(Ordering::SeqCst)
        ),
        (1, 0),
        "the fetch of source A went to the callback of its clone"
    );
}
