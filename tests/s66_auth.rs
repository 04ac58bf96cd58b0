#![cfg(feature = "full")]
//! s66: an outside round on `sturdy-auth`: static credentials, the OAuth2 client-credentials
//! source and its cache (refresh points on paused time, hostile token responses, single flight,
//! failures), the layer alone, under `Buffer` and `ConcurrencyLimit(1)` with kept services and in
//! `ClientBuilder`, secrets in Debug, errors, events, logs and metric labels, and the words of
//! docs/guides/auth.md, README.md and docs/RELIABILITY.md.
//!
//! Its two tests against the real oauth2-mock-server are in tests/interop_oauth.rs (the interop
//! binary, which scripts/interop.sh runs with that server).

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, ClientAuth, ClientCredentials, ExposeSecret, TokenSource};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, ErrorKind};
use tower::{Service, ServiceBuilder, ServiceExt};

const TOKEN_URL: &str = "https://auth.s66.test/oauth/token";
const CLIENT_ID: &str = "s66-client";
const SECRET: &str = "S66SECRETzq9";

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

fn get() -> Req {
    Request::get("https://api.s66.test/orders")
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

/// An in-process token endpoint: `answer(n)` (n from 1) gives status, content type and body,
/// after `delay` of (paused) time.
fn endpoint(
    delay: Duration,
    answer: impl Fn(usize) -> (u16, String) + Send + Sync + 'static,
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
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let (status, body) = answer(n);
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::from(body))
                    .unwrap(),
            )
        }
    });
    (svc, seen)
}

fn tok(n: usize, expires_in: &str) -> String {
    format!(r#"{{"access_token":"TOK66-{n}","token_type":"Bearer","expires_in":{expires_in}}}"#)
}

fn creds<S>(svc: S) -> ClientCredentials
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    ClientCredentials::new(svc, TOKEN_URL, CLIENT_ID, SECRET).unwrap()
}

/// Records the lifetimes of `TokenFetched` events.
fn lifetimes(c: ClientCredentials) -> (ClientCredentials, Arc<Mutex<Vec<Duration>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let c = c.on_event(move |e| {
        if let Event::TokenFetched { lifetime, .. } = e {
            g.lock().unwrap().push(*lifetime);
        }
    });
    (c, got)
}

/// An in-process API: records the Authorization header of each request, answers `status(token)`.
#[allow(clippy::type_complexity)]
fn api(
    status: impl Fn(&str) -> u16 + Send + Sync + 'static,
) -> (
    impl Service<Req, Response = Response<Full<Bytes>>, Error = BoxError, Future: Send + 'static>
        + Clone
        + Send
        + 'static,
    Arc<Mutex<Vec<String>>>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let status = Arc::new(status);
    let svc = tower::service_fn(move |req: Req| {
        let s = s.clone();
        let status = status.clone();
        async move {
            let auth = req
                .headers()
                .get("authorization")
                .map(|v| {
                    assert!(
                        v.is_sensitive(),
                        "the Authorization header is not sensitive"
                    );
                    String::from_utf8_lossy(v.as_bytes()).into_owned()
                })
                .unwrap_or_default();
            let code = status(&auth);
            s.lock().unwrap().push(auth);
            Ok::<_, BoxError>(
                Response::builder()
                    .status(code)
                    .body(Full::default())
                    .unwrap(),
            )
        }
    });
    (svc, seen)
}

// ---------------------------------------------------------------------------------------------
// expires_in: every odd value a token endpoint can send.
// ---------------------------------------------------------------------------------------------

/// RELIABILITY.md: "a token's `expires_in` | missing: 1 h; zero, negative or not a number: an
/// error, no refresh loop; absurd: 24 h". auth.md: "`expires_in` missing => 1 h, zero or
/// negative => a clear error, huge => 24 h".
#[tokio::test(start_paused = true)]
async fn s66_expires_in_lifetimes_as_documented() {
    let day = secs(24 * 3600);
    let cases: [(&str, Option<Duration>); 10] = [
        ("3600", Some(secs(3600))),
        ("1", Some(secs(1))),
        ("86400", Some(day)),
        ("86401", Some(day)),
        ("1e300", Some(day)),
        ("1e400", Some(day)),
        ("18446744073709551615", Some(day)),
        ("184467440737095516150", Some(day)),
        ("0", None),
        ("-5", None),
    ];
    for (value, want) in cases {
        let (svc, seen) = endpoint(Duration::ZERO, move |n| (200, tok(n, value)));
        let (c, got) = lifetimes(creds(svc));
        let r = within("get", secs(60), c.get()).await;
        match want {
            Some(d) => {
                let t = r.unwrap_or_else(|e| panic!("expires_in {value}: {e}"));
                assert_eq!(t.secret().expose_secret(), "TOK66-1");
                assert_eq!(got.lock().unwrap().clone(), vec![d], "expires_in {value}");
            }
            None => {
                let e = r.expect_err(value);
                let msg = e.to_string();
                assert!(
                    msg.contains("expires_in"),
                    "expires_in {value}: the error does not name expires_in: {msg}"
                );
                assert!(!msg.contains("TOK66"), "the token in an error: {msg}");
                // No refresh loop: a second caller at once does not cause another request.
                let _ = c.get().await;
                assert_eq!(seen.hits(), 1, "expires_in {value}: a refresh loop");
            }
        }
    }
    // Missing: 1 h.
    let (svc, _) = endpoint(Duration::ZERO, |_| {
        (
            200,
            r#"{"access_token":"TOK66-x","token_type":"Bearer"}"#.into(),
        )
    });
    let (c, got) = lifetimes(creds(svc));
    c.get().await.unwrap();
    assert_eq!(got.lock().unwrap().clone(), vec![secs(3600)]);
}

/// RELIABILITY.md: "zero, negative or not a number: an error": null, a bool, an array, an
/// object, a string of no number.
#[tokio::test(start_paused = true)]
async fn s66_expires_in_that_is_not_a_number_is_an_error() {
    for value in ["true", "[3600]", r#"{"s":1}"#, r#""abc""#, r#""""#] {
        let (svc, seen) = endpoint(Duration::ZERO, move |n| (200, tok(n, value)));
        let (c, got) = lifetimes(creds(svc));
        match within("get", secs(60), c.get()).await {
            Ok(_) => panic!(
                "expires_in {value} was taken as a lifetime of {:?}, RELIABILITY.md says \
                 not a number is an error",
                got.lock().unwrap()
            ),
            Err(e) => {
                assert!(e.to_string().contains("expires_in"), "{value}: {e}");
                assert!(!e.is_retryable(), "{value}: {e}");
            }
        }
        let _ = c.get().await;
        assert_eq!(seen.hits(), 1, "{value}: no refresh loop");
    }
}

/// RELIABILITY.md: "a token's `expires_in` | missing: 1 h; zero, negative or not a number: an
/// error, no refresh loop (a string of digits, `"3600"`, as some servers send, is read as the
/// number)". The JSON string `"3600"` is a lifetime of 3600 s.
#[tokio::test(start_paused = true)]
async fn s66_expires_in_as_a_json_string_of_digits_is_read_as_the_number() {
    let (svc, _) = endpoint(Duration::ZERO, move |n| (200, tok(n, r#""3600""#)));
    let (c, got) = lifetimes(creds(svc));
    let r = within("get", secs(60), c.get()).await;
    assert!(r.is_ok(), "{:?}", r.err().map(|e| e.to_string()));
    assert_eq!(*got.lock().unwrap(), [secs(3600)]);
}

/// The cache: "reused until `expiry - min(60 s, lifetime / 2)`, then refreshed in the
/// background while callers go on with the still-valid token (a caller waits only when there
/// is no valid token)". For 3600 s: at 3540 s; for 1 s: at 0.5 s; for 100 s: at 50 s (the
/// lifetime counted from when the request was sent).
#[tokio::test(start_paused = true)]
async fn s66_refresh_points_exactly_and_callers_never_wait_with_a_valid_token() {
    for (expires_in, refresh_at) in [(3600u64, ms(3_540_000)), (1, ms(500)), (100, ms(50_000))] {
        // The endpoint takes 100 ms to answer, so a caller that waited would show.
        let (svc, seen) = endpoint(ms(100), move |n| (200, tok(n, &expires_in.to_string())));
        let c = creds(svc);
        let start = tokio::time::Instant::now();
        let t = within("first", secs(60), c.get()).await.unwrap();
        assert_eq!(t.secret().expose_secret(), "TOK66-1");
        assert_eq!(start.elapsed(), ms(100));
        tokio::time::sleep_until(start + refresh_at - ms(1)).await;
        let t = c.get().await.unwrap();
        assert_eq!(t.secret().expose_secret(), "TOK66-1");
        tokio::task::yield_now().await;
        assert_eq!(
            seen.hits(),
            1,
            "{expires_in}: refreshed before {refresh_at:?}"
        );
        tokio::time::sleep_until(start + refresh_at + ms(1)).await;
        let before = tokio::time::Instant::now();
        let t = c.get().await.unwrap();
        assert_eq!(
            before.elapsed(),
            Duration::ZERO,
            "{expires_in}: a caller waited though a valid token exists"
        );
        assert_eq!(t.secret().expose_secret(), "TOK66-1");
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
        assert_eq!(seen.hits(), 2, "{expires_in}: no refresh at {refresh_at:?}");
        // Many callers during the refresh: the old token at once, no more requests.
        for _ in 0..20 {
            let before = tokio::time::Instant::now();
            assert_eq!(c.get().await.unwrap().secret().expose_secret(), "TOK66-1");
            assert_eq!(before.elapsed(), Duration::ZERO);
        }
        assert_eq!(seen.hits(), 2);
        tokio::time::sleep(ms(100)).await;
        tokio::task::yield_now().await;
        assert_eq!(c.get().await.unwrap().secret().expose_secret(), "TOK66-2");
        assert_eq!(seen.hits(), 2);
    }
}

/// A token endpoint slower than the lifetime it grants (2 s to answer `expires_in: 1`): the
/// token is expired on arrival if counted from the request. Whatever the source does, it must
/// not loop on the endpoint nor hang its caller.
#[tokio::test(start_paused = true)]
async fn s66_a_token_slower_than_its_lifetime_does_not_loop() {
    let (svc, seen) = endpoint(secs(2), |n| (200, tok(n, "1")));
    let c = creds(svc);
    let start = tokio::time::Instant::now();
    let mut outcomes = Vec::new();
    while start.elapsed() < secs(20) {
        let r = within("get", secs(40), c.get()).await;
        outcomes.push(
            r.map(|t| t.secret().expose_secret().to_owned())
                .map_err(|e| e.to_string()),
        );
        tokio::time::sleep(ms(100)).await;
    }
    assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    assert!(seen.hits() <= 15, "{} token requests in 20 s", seen.hits());
}

/// A 1-second token polled every 10 ms for 10 s: a refresh per half lifetime, not per call.
#[tokio::test(start_paused = true)]
async fn s66_a_one_second_token_is_not_refetched_per_call() {
    let (svc, seen) = endpoint(ms(1), |n| (200, tok(n, "1")));
    let c = creds(svc);
    for _ in 0..1000 {
        within("get", secs(5), c.get()).await.unwrap();
        tokio::time::sleep(ms(10)).await;
    }
    let hits = seen.hits();
    assert!((15..=25).contains(&hits), "{hits} token requests in 10 s");
}

/// `with_max_lifetime(0)`, `with_default_lifetime(0)`: "at least 1 s".
/// `with_default_lifetime(Duration::MAX)`, `with_max_lifetime(Duration::MAX)`,
/// `with_skew(Duration::MAX)`, `with_request_timeout(Duration::MAX)`: hostile settings must
/// neither panic nor break the source.
#[tokio::test(start_paused = true)]
async fn s66_extreme_lifetime_settings() {
    let (svc, _) = endpoint(Duration::ZERO, |n| (200, tok(n, "3600")));
    let (c, got) = lifetimes(creds(svc).with_max_lifetime(Duration::ZERO));
    c.get().await.unwrap();
    assert_eq!(got.lock().unwrap().clone(), vec![secs(1)], "max lifetime 0");

    let (svc, _) = endpoint(Duration::ZERO, |_| {
        (
            200,
            r#"{"access_token":"TOK66-d","token_type":"Bearer"}"#.into(),
        )
    });
    let (c, got) = lifetimes(creds(svc).with_default_lifetime(Duration::ZERO));
    c.get().await.unwrap();
    assert_eq!(
        got.lock().unwrap().clone(),
        vec![secs(1)],
        "default lifetime 0"
    );

    for which in 0..4 {
        let (svc, seen) = endpoint(Duration::ZERO, |n| {
            if n == 1 {
                (
                    200,
                    r#"{"access_token":"TOK66-1","token_type":"Bearer"}"#.into(),
                )
            } else {
                (200, tok(n, "18446744073709551615"))
            }
        });
        let c = creds(svc);
        let c = match which {
            0 => c
                .with_default_lifetime(Duration::MAX)
                .with_max_lifetime(Duration::MAX),
            1 => c.with_skew(Duration::MAX),
            2 => c.with_request_timeout(Duration::MAX),
            _ => c
                .with_max_lifetime(Duration::MAX)
                .with_skew(Duration::MAX)
                .with_request_timeout(Duration::MAX),
        };
        let t = within("get", secs(60), c.get()).await.unwrap();
        assert_eq!(t.secret().expose_secret(), "TOK66-1", "setting {which}");
        // A 401 makes it fetch the next one (u64::MAX seconds).
        c.invalidate(&t);
        let t = within("get 2", secs(60), c.get()).await.unwrap();
        assert_eq!(t.secret().expose_secret(), "TOK66-2", "setting {which}");
        tokio::time::sleep(secs(10 * 24 * 3600)).await;
        within("get 3", secs(60), c.get()).await.unwrap();
        assert!(seen.hits() >= 2);
    }
}

/// The layer's waits with `Duration::MAX`: `with_token_timeout(MAX)` and
/// `with_attempt_timeout(MAX)` must not panic (an `Instant + MAX`).
#[tokio::test(start_paused = true)]
async fn s66_extreme_layer_timeouts_do_not_panic() {
    let (svc, _) = endpoint(ms(10), |n| (200, tok(n, "3600")));
    let (api, _) = api(|a| if a == "Bearer TOK66-1" { 401 } else { 200 });
    let layer = AuthLayer::oauth2(creds(svc))
        .with_token_timeout(Duration::MAX)
        .with_attempt_timeout(Duration::MAX)
        .with_replay_limit(usize::MAX);
    assert_eq!(layer.token_timeout(), Duration::MAX);
    let svc = ServiceBuilder::new().layer(layer).service(api);
    let res = within("call", secs(60), svc.clone().oneshot(get()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Hostile token bodies.
// ---------------------------------------------------------------------------------------------

/// auth.md: "`ClientCredentials` refuses such an `access_token` [one that cannot go in the
/// `Authorization` header] when it reads the token response, and does not cache it." A
/// non-ASCII token *can* go in a header (obs-text), a 60 KiB token too: both are sent as they
/// came; a token_type of "BEARER" is the same type (RFC 6749 §5.1: case-insensitive).
#[tokio::test(start_paused = true)]
async fn s66_odd_but_valid_tokens_are_sent_as_they_came() {
    let big = "A".repeat(60 * 1024);
    for (token, ty) in [
        ("tök€n-66", "Bearer"),
        (big.as_str(), "Bearer"),
        ("TOK66-upper", "BEARER"),
        ("TOK66-lower", "bearer"),
        ("a.b.c~+/=", "Bearer"),
    ] {
        let body = serde_json::json!({"access_token": token, "token_type": ty, "expires_in": 3600})
            .to_string();
        let (svc, seen) = endpoint(Duration::ZERO, move |_| (200, body.clone()));
        let (api, auths) = api(|_| 200);
        let client = ServiceBuilder::new()
            .layer(AuthLayer::oauth2(creds(svc)))
            .service(api);
        let res = within("call", secs(60), client.clone().oneshot(get())).await;
        let res = res.unwrap_or_else(|e| panic!("token {token:.20}.. type {ty}: {e}"));
        assert_eq!(res.status(), 200);
        assert_eq!(
            auths.lock().unwrap().clone(),
            vec![format!("Bearer {token}")],
            "token {:.20}..",
            token
        );
        assert_eq!(seen.hits(), 1);
    }
}

/// Control characters in `access_token` are refused when read, not cached: an `Auth`-kind
/// error (or Body) that does not show the token; the next caller asks again.
#[tokio::test(start_paused = true)]
async fn s66_unsendable_access_tokens_are_refused_and_not_cached() {
    for bad in [
        "TOK66\r\nx-injected: 1",
        "TOK66\u{0}",
        "TOK66\u{7f}",
        "TOK66\tx\n",
    ] {
        let body =
            serde_json::json!({"access_token": bad, "token_type": "Bearer", "expires_in": 3600})
                .to_string();
        let (svc, seen) = endpoint(Duration::ZERO, move |_| (200, body.clone()));
        let (api, auths) = api(|_| 200);
        let client = ServiceBuilder::new()
            .layer(AuthLayer::oauth2(creds(svc)))
            .service(api);
        let e = within("call", secs(60), client.clone().oneshot(get()))
            .await
            .expect_err(bad);
        let text = chain(&*e);
        assert!(!text.contains("TOK66"), "the token shows: {text}");
        assert!(auths.lock().unwrap().is_empty(), "sent {bad:?}");
        assert_eq!(
            sturdy::core::classify::delivery(&*e),
            sturdy::core::Delivery::NotSent
        );
        // Not cached: after the backoff, the next call asks again.
        tokio::time::sleep(secs(2)).await;
        let _ = client.clone().oneshot(get()).await;
        assert_eq!(seen.hits(), 2, "{bad:?} was cached");
    }
}

/// An empty `access_token` (or one of spaces) cannot authenticate anything: the static layer
/// refuses an empty token as "almost always an unset environment variable". A token endpoint
/// that answers `""` or blanks must not make every API call go out as `Authorization: Bearer `
/// (refused: "an empty, blank or non-string access_token").
#[tokio::test(start_paused = true)]
async fn s66_an_empty_access_token_is_refused() {
    for bad in ["", "   "] {
        let body =
            serde_json::json!({"access_token": bad, "token_type": "Bearer", "expires_in": 3600})
                .to_string();
        let (svc, _) = endpoint(Duration::ZERO, move |_| (200, body.clone()));
        let (api, auths) = api(|_| 200);
        let client = ServiceBuilder::new()
            .layer(AuthLayer::oauth2(creds(svc)))
            .service(api);
        let r = within("call", secs(60), client.clone().oneshot(get())).await;
        assert!(
            r.is_err(),
            "access_token {bad:?} was sent as {:?}",
            auths.lock().unwrap()
        );
    }
}

/// Token bodies that are not a token: an HTML page with 200, a JSON array, missing
/// `access_token`, a number as `access_token`, a 200 carrying an OAuth error. Each is a
/// `sturdy_core::Error` naming the token endpoint, not retryable, not showing the page whole.
#[tokio::test(start_paused = true)]
async fn s66_bodies_that_are_not_a_token() {
    let html = format!(
        "<!DOCTYPE html><html><body><h1>Sign in</h1>{}</body></html>",
        "<p>lorem ipsum</p>".repeat(500)
    );
    let cases = [
        html.clone(),
        "[1,2,3]".to_owned(),
        r#"{"token_type":"Bearer","expires_in":3600}"#.to_owned(),
        r#"{"access_token":12345,"token_type":"Bearer","expires_in":3600}"#.to_owned(),
        r#"{"error":"invalid_client","error_description":"nope"}"#.to_owned(),
        String::new(),
        "{".to_owned(),
    ];
    for body in cases {
        let b = body.clone();
        let (svc, _) = endpoint(Duration::ZERO, move |_| (200, b.clone()));
        let e = within("get", secs(60), creds(svc).get())
            .await
            .expect_err(&body[..body.len().min(40)]);
        let msg = e.to_string();
        assert!(msg.contains("https://auth.s66.test/oauth/token"), "{msg}");
        assert!(
            msg.len() < 2000,
            "the page is quoted whole: {} bytes",
            msg.len()
        );
        assert!(!e.is_retryable(), "{msg}");
    }
}

/// RELIABILITY.md: "the token response body | 64 KiB | fixed". A body of exactly 64 KiB is
/// read; one byte more is refused with a `Body` error that says so; 10 MB (over the wire,
/// with and without a Content-Length) is refused without reading it all.
#[tokio::test(start_paused = true)]
async fn s66_token_response_body_limit_is_64_kib() {
    fn padded(total: usize) -> String {
        let head = r#"{"access_token":"TOK66-1","token_type":"Bearer","expires_in":3600,"pad":""#;
        let tail = r#""}"#;
        format!(
            "{head}{}{tail}",
            "p".repeat(total - head.len() - tail.len())
        )
    }
    let (svc, _) = endpoint(Duration::ZERO, |_| (200, padded(64 * 1024)));
    let t = within("64 KiB", secs(60), creds(svc).get()).await;
    assert_eq!(t.unwrap().secret().expose_secret(), "TOK66-1");
    let (svc, _) = endpoint(Duration::ZERO, |_| (200, padded(64 * 1024 + 1)));
    let e = within("64 KiB + 1", secs(60), creds(svc).get())
        .await
        .expect_err("64 KiB + 1");
    assert!(e.to_string().contains("65536-byte limit"), "{e}");
    assert!(!e.is_retryable(), "{e}");
    assert!(!e.to_string().contains("TOK66"), "{e}");
}

/// `ErrorKind::Body`: "A body could not be read, was too large, or was not what was
/// expected." A token response over the 64 KiB limit is a body too large.
#[tokio::test(start_paused = true)]
async fn s66_a_token_response_over_the_limit_is_a_body_error() {
    let big = format!(
        r#"{{"access_token":"TOK66-1","pad":"{}"}}"#,
        "p".repeat(70 * 1024)
    );
    let (svc, _) = endpoint(Duration::ZERO, move |_| (200, big.clone()));
    let e = within("get", secs(60), creds(svc).get())
        .await
        .expect_err("70 KiB");
    assert_eq!(*e.kind(), ErrorKind::Body, "{e}");
}

// ---------------------------------------------------------------------------------------------
// Token endpoint errors: kinds and words.
// ---------------------------------------------------------------------------------------------

/// auth.md: "A 500, 502, 503, 504, 429, 425 or 408 from the token endpoint ... are retryable;
/// another 5xx (501, 505...) and `invalid_client` are not." And: "the token endpoint ...
/// refused the token request with invalid_client (401 Unauthorized): the client id or secret is
/// wrong". "A 503 from the token endpoint keeps the kind `Server(503)`".
#[tokio::test(start_paused = true)]
async fn s66_token_endpoint_statuses_kinds_and_words() {
    for (status, retryable) in [
        (500u16, true),
        (502, true),
        (503, true),
        (504, true),
        (429, true),
        (425, true),
        (408, true),
        (501, false),
        (505, false),
        (599, false),
        (418, false),
    ] {
        let (svc, _) = endpoint(Duration::ZERO, move |_| {
            (status, r#"{"error":"temporarily_unavailable"}"#.into())
        });
        let e = within("get", secs(60), creds(svc).get())
            .await
            .expect_err("error status");
        assert_eq!(e.is_retryable(), retryable, "{status}: {e}");
        assert!(
            e.to_string()
                .contains("the token endpoint https://auth.s66.test/oauth/token"),
            "{status}: {e}"
        );
        assert!(e.to_string().contains(&status.to_string()), "{status}: {e}");
        if status == 503 {
            assert_eq!(
                *e.kind(),
                ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE)
            );
        }
    }
    for status in [400u16, 401] {
        let (svc, _) = endpoint(Duration::ZERO, move |_| {
            (
                status,
                r#"{"error":"invalid_client","error_description":"client authentication failed"}"#
                    .into(),
            )
        });
        let e = within("get", secs(60), creds(svc).get())
            .await
            .expect_err("invalid_client");
        let msg = e.to_string();
        assert!(!e.is_retryable(), "{msg}");
        assert!(
            msg.contains("refused the token request with invalid_client"),
            "{msg}"
        );
        assert!(msg.contains("the client id or secret is wrong"), "{msg}");
        assert!(msg.contains("client authentication failed"), "{msg}");
        assert!(!msg.contains(SECRET), "{msg}");
    }
    // The example of auth.md, word for word up to "...".
    let (svc, _) = endpoint(Duration::ZERO, |_| {
        (401, r#"{"error":"invalid_client"}"#.into())
    });
    let c = ClientCredentials::new(
        svc,
        "https://auth.example.com/oauth/token",
        CLIENT_ID,
        SECRET,
    )
    .unwrap();
    let msg = c.get().await.unwrap_err().to_string();
    assert!(
        msg.starts_with(
            "the token endpoint https://auth.example.com/oauth/token refused the token request \
             with invalid_client (401 Unauthorized): the client id or secret is wrong"
        ),
        "{msg}"
    );
}

/// "The server's own words (its `error` and `error_description`, cut to 64 and 200
/// characters)": characters, not bytes, so a multi-byte description is cut without a panic and
/// without a broken character.
#[tokio::test(start_paused = true)]
async fn s66_error_words_are_cut_by_characters() {
    for ch in ['é', '€', '😀', 'x'] {
        let error: String = std::iter::repeat_n(ch, 100).collect();
        let desc: String = std::iter::repeat_n(ch, 300).collect();
        let body = serde_json::json!({"error": format!("E{error}"), "error_description": format!("D{desc}")})
            .to_string();
        let (svc, _) = endpoint(Duration::ZERO, move |_| (400, body.clone()));
        let e = within("get", secs(60), creds(svc).get())
            .await
            .expect_err("400");
        let msg = e.to_string();
        let run = |start: char| {
            let i = msg
                .find(start)
                .unwrap_or_else(|| panic!("{start} missing: {msg}"));
            msg[i + 1..].chars().take_while(|c| *c == ch).count()
        };
        let (er, dr) = (run('E'), run('D'));
        assert!(
            (40..=64).contains(&(er + 1)),
            "{ch}: error cut to {} characters: {msg}",
            er + 1
        );
        assert!(
            (150..=200).contains(&(dr + 1)),
            "{ch}: description cut to {} characters: {msg}",
            dr + 1
        );
    }
}

/// "quoted with the client secret and the token URL's user info and query replaced by
/// `[redacted]`": a server that echoes the whole request (form body with the secret
/// form-encoded, the Basic header, the URL) shows none of it.
#[tokio::test(start_paused = true)]
async fn s66_an_echoing_token_endpoint_shows_no_secret() {
    let secret = "S66 p@ss+w/rd é&=";
    let url = "https://svc:URLPASSWORD66@auth.s66.test/oauth/token?key=QUERYKEY66&x=1";
    for auth in [ClientAuth::SecretBasic, ClientAuth::SecretPost] {
        let seen = Seen::default();
        let s = seen.clone();
        let svc = tower::service_fn(move |req: Req| {
            let s = s.clone();
            async move {
                s.hits.fetch_add(1, Ordering::SeqCst);
                let basic = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let uri = req.uri().to_string();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let echo = format!("{} {} {}", String::from_utf8_lossy(&body), basic, uri);
                let body =
                    serde_json::json!({"error": format!("bad {echo}"), "error_description": echo});
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(400)
                        .body(Full::<Bytes>::from(body.to_string()))
                        .unwrap(),
                )
            }
        });
        let c = ClientCredentials::new(svc, url, CLIENT_ID, secret)
            .unwrap()
            .with_client_auth(auth);
        let e = within("get", secs(60), c.get()).await.expect_err("400");
        let text = format!("{} || {:?} || {c:?}", chain(&e), e);
        for leak in [
            "S66 p@ss",
            "S66+p%40ss",
            "S66%20p%40ss",
            "URLPASSWORD66",
            "QUERYKEY66",
            &base64_basic(CLIENT_ID, secret),
        ] {
            assert!(!text.contains(leak), "{auth:?}: {leak} shows in: {text}");
        }
        assert_eq!(seen.hits(), 1);
    }
}

fn base64_basic(id: &str, secret: &str) -> String {
    use base64_like::encode;
    encode(format!("{}:{}", form_enc(id), form_enc(secret)).as_bytes())
}

/// A tiny standard base64 encoder (the test needs no crate for it).
mod base64_like {
    pub(super) fn encode(input: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
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
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// `ClientCredentials::new` with a URL that is not valid or not absolute: a `Config` error,
/// which does not repeat the secret parts of the URL ("Messages name the token URL without its
/// user info or query"). A valid URL with user info and query: `describe()` and `Debug` show
/// neither.
#[test]
fn s66_token_urls_with_secrets_in_errors_describe_and_debug() {
    let (svc, _) = endpoint(Duration::ZERO, |n| (200, tok(n, "3600")));
    for bad in [
        "/oauth/token?key=QUERYKEY66",
        "auth.s66.test/oauth/token?key=QUERYKEY66",
        "https://u:URLPASSWORD66@auth s66/token?key=QUERYKEY66",
        "",
    ] {
        let e = ClientCredentials::new(svc.clone(), bad, CLIENT_ID, SECRET).expect_err(bad);
        assert_eq!(*e.kind(), ErrorKind::Config, "{bad}: {e}");
        let text = format!("{} {:?}", chain(&e), e);
        assert!(!text.contains("URLPASSWORD66"), "{text}");
        assert!(!text.contains("QUERYKEY66"), "{text}");
        assert!(!text.contains(SECRET), "{text}");
    }
    let c = ClientCredentials::new(
        svc,
        "https://u:URLPASSWORD66@auth.s66.test:8443/oauth/token?key=QUERYKEY66",
        CLIENT_ID,
        SECRET,
    )
    .unwrap();
    assert_eq!(
        c.describe(),
        "the token endpoint https://auth.s66.test:8443/oauth/token"
    );
    let dbg = format!("{c:?} {:?}", AuthLayer::oauth2(c.clone()));
    for leak in ["URLPASSWORD66", "QUERYKEY66", SECRET] {
        assert!(!dbg.contains(leak), "{dbg}");
    }
}

// ---------------------------------------------------------------------------------------------
// What the token request carries.
// ---------------------------------------------------------------------------------------------

/// application/x-www-form-urlencoded, decoded (no crate for it in this package's tests).
fn form(body: &Bytes) -> Vec<(String, String)> {
    fn dec(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(h, 16).unwrap());
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }
    std::str::from_utf8(body)
        .unwrap()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (dec(k), dec(v))
        })
        .collect()
}

/// application/x-www-form-urlencoded, encoded as the WHATWG URL standard says.
fn form_enc(s: &str) -> String {
    let mut out = String::new();
    for &c in s.as_bytes() {
        match c {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(c as char);
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{c:02X}")),
        }
    }
    out
}

/// The form is form-encoded: a scope, audience or extra parameter with `&` and `=` cannot add
/// or override a parameter (`grant_type`, `client_secret`). RFC 6749 §2.3.1: Basic carries the
/// id and secret form-encoded first.
#[tokio::test(start_paused = true)]
async fn s66_token_request_parameters_cannot_be_injected() {
    let id = "s66 id:1&x=y";
    let secret = "p@ss:w rd+/é&grant_type=password";
    for auth in [ClientAuth::SecretBasic, ClientAuth::SecretPost] {
        let (svc, seen) = endpoint(Duration::ZERO, |n| (200, tok(n, "3600")));
        let c = ClientCredentials::new(svc, TOKEN_URL, id, secret)
            .unwrap()
            .with_client_auth(auth)
            .with_scopes(["read&grant_type=password", "write=1"])
            .with_audience("aud&client_secret=evil")
            .with_param("resource", "r&client_id=evil&grant_type=x")
            .unwrap()
            .with_param("x&grant_type", "password")
            .unwrap();
        within("get", secs(60), c.get()).await.unwrap();
        let (parts, body) = seen.last();
        assert_eq!(parts.method, http::Method::POST);
        assert_eq!(
            parts.headers["content-type"]
                .to_str()
                .unwrap()
                .split(';')
                .next()
                .unwrap(),
            "application/x-www-form-urlencoded"
        );
        let f = form(&body);
        let all = |k: &str| {
            f.iter()
                .filter(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            all("grant_type"),
            vec!["client_credentials"],
            "{auth:?}: {f:?}"
        );
        assert_eq!(
            all("scope"),
            vec!["read&grant_type=password write=1"],
            "{f:?}"
        );
        assert_eq!(all("audience"), vec!["aud&client_secret=evil"], "{f:?}");
        assert_eq!(
            all("resource"),
            vec!["r&client_id=evil&grant_type=x"],
            "{f:?}"
        );
        assert_eq!(all("x&grant_type"), vec!["password"], "{f:?}");
        match auth {
            ClientAuth::SecretPost => {
                assert_eq!(all("client_id"), vec![id], "{f:?}");
                assert_eq!(all("client_secret"), vec![secret], "{f:?}");
                assert!(parts.headers.get("authorization").is_none());
            }
            _ => {
                assert!(all("client_secret").is_empty(), "{f:?}");
                let h = parts.headers["authorization"].to_str().unwrap().to_owned();
                assert!(parts.headers["authorization"].is_sensitive());
                assert_eq!(h, format!("Basic {}", base64_basic(id, secret)));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Single flight, failures, backoff, cancellation.
// ---------------------------------------------------------------------------------------------

/// "one request for N callers": 200 callers on a multi-thread runtime, through the layer,
/// some dropped at seeded random points, cost one token request; the survivors all get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s66_many_callers_one_token_request_some_dropped() {
    // Seeded (splitmix64): `rand` is not a dependency of this package's tests.
    let mut state: u64 = 66;
    let mut next = move |n: u64| {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    };
    let (svc, seen) = endpoint(ms(50), |n| (200, tok(n, "3600")));
    let (api, auths) = api(|_| 200);
    let client = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(creds(svc)))
        .service(api);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let drop_after = if i % 3 == 0 { Some(ms(next(60))) } else { None };
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let call = c.oneshot(get());
            match drop_after {
                Some(d) => tokio::time::timeout(d, call).await.ok().map(|r| r.unwrap()),
                None => Some(call.await.unwrap()),
            }
        }));
    }
    for t in tasks {
        within("caller", secs(5), t).await.unwrap();
    }
    assert_eq!(seen.hits(), 1);
    assert!(auths.lock().unwrap().iter().all(|a| a == "Bearer TOK66-1"));
    // And afterwards, one more call: no request.
    within("after", secs(5), client.oneshot(get()))
        .await
        .unwrap();
    assert_eq!(seen.hits(), 1);
}

/// "a failed refresh keeps a still-valid token and backs off (1 s doubling to 60 s)", and
/// "a caller with no valid token during the backoff gets the last error at once". Here the
/// token expires during the backoff of a failing refresh: callers get the error at once, the
/// endpoint is asked at the documented points only.
#[tokio::test(start_paused = true)]
async fn s66_a_failing_refresh_keeps_the_token_then_fails_at_once_in_the_backoff() {
    // Token 1 lives 10 s (refresh at 5 s); every later request fails with 503.
    let (svc, seen) = endpoint(Duration::ZERO, |n| {
        if n == 1 {
            (200, tok(1, "10"))
        } else {
            (503, r#"{"error":"temporarily_unavailable"}"#.into())
        }
    });
    let c = creds(svc);
    let start = tokio::time::Instant::now();
    c.get().await.unwrap();
    let mut asked_at = Vec::new();
    let mut last = seen.hits();
    let mut errors = 0;
    while start.elapsed() < secs(200) {
        let before = tokio::time::Instant::now();
        match c.get().await {
            Ok(t) => {
                assert_eq!(t.secret().expose_secret(), "TOK66-1");
                assert!(
                    start.elapsed() < secs(10),
                    "an expired token at {:?}",
                    start.elapsed()
                );
            }
            Err(e) => {
                errors += 1;
                assert!(start.elapsed() >= secs(10), "{e}");
                assert_eq!(
                    *e.kind(),
                    ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE)
                );
            }
        }
        assert_eq!(before.elapsed(), Duration::ZERO, "a caller waited");
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        if seen.hits() != last {
            last = seen.hits();
            asked_at.push(start.elapsed().as_millis() / 100);
        }
        tokio::time::sleep(ms(100)).await;
    }
    assert!(errors > 0);
    // Refresh at 5 s, then 1, 2, 4, 8, 16, 32, 60, 60 s later (within a poll of 100 ms).
    let want = [50u128, 60, 80, 120, 200, 360, 680, 1280, 1880];
    assert_eq!(
        &asked_at[..want.len().min(asked_at.len())],
        &want[..],
        "token requests at (in 100 ms) {asked_at:?}"
    );
}

/// "the token request runs as a task of its own ... a caller that gives up does not cancel it
/// for the others": the only waiter, with `with_token_timeout(ZERO)`, fails at once with a
/// `Timeout` that names the endpoint and says the request was not sent; the next caller shares
/// the same request and gets its token: one token request.
#[tokio::test(start_paused = true)]
async fn s66_zero_token_timeout_fails_at_once_and_the_request_goes_on() {
    let (svc, seen) = endpoint(ms(200), |n| (200, tok(n, "3600")));
    let (api, auths) = api(|_| 200);
    let client = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(creds(svc)).with_token_timeout(Duration::ZERO))
        .service(api);
    let before = tokio::time::Instant::now();
    let e = client.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(before.elapsed(), Duration::ZERO);
    let se = err_of(&e);
    assert_eq!(*se.kind(), ErrorKind::Timeout, "{se}");
    assert!(se.is_retryable());
    let msg = se.to_string();
    assert!(
        msg.starts_with(
            "no access token from the token endpoint https://auth.s66.test/oauth/token within"
        ),
        "{msg}"
    );
    assert!(msg.contains("the request was not sent"), "{msg}");
    assert!(se.cause_is_elsewhere(), "{msg}");
    assert_eq!(
        sturdy::core::classify::delivery(&*e),
        sturdy::core::Delivery::NotSent
    );
    assert!(auths.lock().unwrap().is_empty());
    tokio::time::sleep(ms(300)).await;
    let res = client.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.hits(), 1);
}

/// A 401 from the API: "the token is invalidated, a new one fetched, the request replayed
/// once" — never a loop, whatever the API does; 403 as is.
#[tokio::test(start_paused = true)]
async fn s66_api_401s_cost_bounded_requests_and_403_is_as_is() {
    let (svc, seen) = endpoint(ms(5), |n| (200, tok(n, "3600")));
    let (api401, auths) = api(|_| 401);
    let client = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(creds(svc)))
        .service(api401);
    for _ in 0..50 {
        let res = within("call", secs(60), client.clone().oneshot(get()))
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
        tokio::time::sleep(ms(10)).await;
    }
    let api_calls = auths.lock().unwrap().len();
    assert!(api_calls <= 100, "{api_calls} API requests for 50 calls");
    assert!(
        seen.hits() <= 10,
        "{} token requests for 50 calls in 0.5 s",
        seen.hits()
    );

    let (svc, seen) = endpoint(ms(5), |n| (200, tok(n, "3600")));
    let (api, auths) = api(|_| 403);
    let client = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(creds(svc)))
        .service(api);
    for _ in 0..5 {
        let res = client.clone().oneshot(get()).await.unwrap();
        assert_eq!(res.status(), 403);
    }
    assert_eq!(auths.lock().unwrap().len(), 5);
    assert_eq!(seen.hits(), 1);
}

// ---------------------------------------------------------------------------------------------
// Static credentials.
// ---------------------------------------------------------------------------------------------

/// auth.md: a value that cannot go in a header, an empty token or key (or only spaces and
/// tabs), an empty query parameter name or a Basic user with `:` is a `Config` error; a Basic
/// password may be empty. No secret in the error or in `Debug`.
#[test]
fn s66_static_credentials_validation() {
    let name = HeaderName::from_static("x-api-key");
    let bad: Vec<(&str, Result<AuthLayer, sturdy::core::Error>)> = vec![
        ("bearer empty", AuthLayer::bearer("")),
        ("bearer spaces", AuthLayer::bearer(" \t \t")),
        ("bearer newline", AuthLayer::bearer("S66SECRET\nx")),
        ("bearer nul", AuthLayer::bearer("S66SECRET\0")),
        ("key empty", AuthLayer::api_key(name.clone(), "")),
        ("key tab", AuthLayer::api_key(name.clone(), "\t")),
        ("key cr", AuthLayer::api_key(name.clone(), "S66SECRET\r")),
        ("query name", AuthLayer::api_key_query("", "S66SECRET")),
        ("query key", AuthLayer::api_key_query("key", " ")),
        ("basic colon", AuthLayer::basic("us:er", "S66SECRET")),
    ];
    for (what, r) in bad {
        let e = r.expect_err(what);
        assert_eq!(*e.kind(), ErrorKind::Config, "{what}: {e}");
        let text = format!("{e} {e:?}");
        assert!(!text.contains("S66SECRET"), "{what}: {text}");
    }
    for (what, r) in [
        ("basic empty password", AuthLayer::basic("user", "")),
        ("bearer non-ascii", AuthLayer::bearer("S66SECRET-é")),
        ("key inner space", AuthLayer::api_key(name, "S66SECRET a")),
        ("query é", AuthLayer::api_key_query("clé", "S66SECRET&x=1")),
    ] {
        let l = r.unwrap_or_else(|e| panic!("{what}: {e}"));
        let dbg = format!("{l:?}");
        assert!(!dbg.contains("S66SECRET"), "{what}: {dbg}");
    }
}

/// Static credentials over the layer: the header is sensitive; an API key in a query is
/// form-encoded (a key with `&` cannot add a parameter), the caller's own copy is replaced.
#[tokio::test]
async fn s66_static_credentials_on_the_wire_shape() {
    let seen = Arc::new(Mutex::new(Vec::<(String, Option<String>, bool)>::new()));
    let s = seen.clone();
    let inner = tower::service_fn(move |req: Req| {
        let s = s.clone();
        async move {
            let (h, sens) = req
                .headers()
                .get("authorization")
                .or_else(|| req.headers().get("x-api-key"))
                .map(|v| (Some(v.to_str().unwrap_or("?").to_owned()), v.is_sensitive()))
                .unwrap_or((None, true));
            s.lock().unwrap().push((req.uri().to_string(), h, sens));
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        }
    });
    let req = |uri: &str| Request::get(uri).body(Full::<Bytes>::default()).unwrap();
    let layers = [
        AuthLayer::bearer("S66SECRET").unwrap(),
        AuthLayer::api_key(HeaderName::from_static("x-api-key"), "S66SECRET").unwrap(),
        AuthLayer::basic("user", "").unwrap(),
        AuthLayer::api_key_query("api_key", "S66 SECRET&admin=1").unwrap(),
    ];
    for l in layers {
        let svc = ServiceBuilder::new().layer(l).service(inner.clone());
        svc.oneshot(req("http://api.s66.test/x?a=1&api_key=mine&b=%20"))
            .await
            .unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].1.as_deref(), Some("Bearer S66SECRET"));
    assert_eq!(seen[1].1.as_deref(), Some("S66SECRET"));
    assert_eq!(seen[2].1.as_deref(), Some("Basic dXNlcjo="));
    assert!(seen.iter().all(|s| s.2), "not sensitive: {seen:?}");
    let q = seen[3].0.split_once('?').unwrap().1.to_owned();
    let pairs = form(&Bytes::from(q.clone()));
    let keys: Vec<_> = pairs.iter().filter(|(k, _)| k == "api_key").collect();
    assert_eq!(keys.len(), 1, "{q}");
    assert_eq!(keys[0].1, "S66 SECRET&admin=1", "{q}");
    assert!(!pairs.iter().any(|(k, _)| k == "admin"), "injected: {q}");
    assert!(q.starts_with("a=1&"), "{q}");
    assert!(q.contains("b=%20"), "the caller's pair changed: {q}");
}

// ---------------------------------------------------------------------------------------------
// Secrets in events, logs and metric labels.
// ---------------------------------------------------------------------------------------------

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

/// "no `Debug` or log line shows them" and secrets never in metric labels or events: a run of
/// fetches, failures (with an echoing endpoint), 401s and replays, with TRACE logs and a local
/// metrics recorder, shows neither the client secret, the tokens, nor the URL's secrets.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s66_no_secret_in_logs_events_or_metric_labels() {
    let rec = metrics_util::debugging::DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _m = metrics::set_default_local_recorder(&rec);
    let buf = Buf::default();
    let b = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || b.clone())
        .finish();
    let _t = tracing::subscriber::set_default(sub);
    let events = Arc::new(Mutex::new(String::new()));

    let (svc, seen) = endpoint(ms(5), |n| match n % 3 {
        0 => (
            400,
            format!(
                r#"{{"error":"invalid_request","error_description":"got {SECRET} QUERYKEY66"}}"#
            ),
        ),
        _ => (200, tok(n, "120")),
    });
    let ev = events.clone();
    let ev2 = events.clone();
    let c = ClientCredentials::new(
        svc,
        "https://u:URLPASSWORD66@auth.s66.test/oauth/token?key=QUERYKEY66",
        CLIENT_ID,
        SECRET,
    )
    .unwrap()
    .on_event(move |e| ev.lock().unwrap().push_str(&format!("{e:?}\n")));
    let (api, _) = api(|a| {
        if a.ends_with("-1") || a.ends_with("-4") {
            401
        } else {
            200
        }
    });
    let client = ServiceBuilder::new()
        .layer(
            AuthLayer::oauth2(c)
                .on_event(move |e| ev2.lock().unwrap().push_str(&format!("{e:?}\n"))),
        )
        .service(api);
    let mut errors = String::new();
    for _ in 0..40 {
        match client.clone().oneshot(get()).await {
            Ok(_) => {}
            Err(e) => errors.push_str(&format!("{} {:?}\n", chain(&*e), e)),
        }
        tokio::time::sleep(secs(7)).await;
    }
    assert!(seen.hits() >= 4);
    let logs = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    let metrics = format!("{:?}", snap.snapshot().into_vec());
    let events = events.lock().unwrap().clone();
    assert!(events.contains("TokenFetched"), "{events}");
    assert!(
        metrics.contains("auth.s66.test"),
        "no auth metrics? {metrics}"
    );
    for (what, text) in [
        ("logs", &logs),
        ("metrics", &metrics),
        ("events", &events),
        ("errors", &errors),
    ] {
        for leak in [SECRET, "TOK66", "URLPASSWORD66", "QUERYKEY66"] {
            assert!(!text.contains(leak), "{leak} in {what}: {text}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Composition: Send/Sync/Clone, Buffer, ConcurrencyLimit(1), kept services, ClientBuilder.
// ---------------------------------------------------------------------------------------------

#[test]
fn s66_clone_send_sync_as_documented() {
    fn css<T: Clone + Send + Sync + 'static>() {}
    fn send<T: Send>(_: &T) {}
    css::<AuthLayer>();
    css::<ClientCredentials>();
    css::<sturdy::auth::Token>();
    css::<ClientAuth>();
    let (api, _) = api(|_| 200);
    let auth = ServiceBuilder::new()
        .layer(AuthLayer::bearer("x").unwrap())
        .service(api);
    fn css_val<T: Clone + Send + Sync>(_: &T) {}
    css_val(&auth);
    let fut = auth.oneshot(get());
    send(&fut);
    // A client that is `Send` but not `Sync` will do as the token client.
    struct NotSync<S>(S, std::marker::PhantomData<std::cell::Cell<()>>);
    impl<S: Clone> Clone for NotSync<S> {
        fn clone(&self) -> Self {
            Self(self.0.clone(), std::marker::PhantomData)
        }
    }
    impl<S: Service<Req>> Service<Req> for NotSync<S> {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;
        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            self.0.poll_ready(cx)
        }
        fn call(&mut self, r: Req) -> Self::Future {
            self.0.call(r)
        }
    }
    let (svc, _) = endpoint(Duration::ZERO, |n| (200, tok(n, "3600")));
    let c = ClientCredentials::new(
        NotSync(svc, std::marker::PhantomData),
        TOKEN_URL,
        CLIENT_ID,
        SECRET,
    )
    .unwrap();
    css_val(&c);
}

/// A real token endpoint and API on 127.0.0.1 (axum), the token client a hyper-util client.
struct Wire {
    token_url: String,
    api_url: String,
    token_hits: Arc<AtomicUsize>,
    api_hits: Arc<AtomicUsize>,
}

async fn wire(refuse_first_token: bool) -> Wire {
    use axum::routing::{get as aget, post};
    let token_hits = Arc::new(AtomicUsize::new(0));
    let api_hits = Arc::new(AtomicUsize::new(0));
    let th = token_hits.clone();
    let ah = api_hits.clone();
    let app = axum::Router::new()
        .route(
            "/token",
            post(move |body: Bytes| {
                let th = th.clone();
                async move {
                    let f = form(&body);
                    assert!(f.contains(&("grant_type".into(), "client_credentials".into())));
                    let n = th.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(ms(20)).await;
                    ([("content-type", "application/json")], tok(n, "3600"))
                }
            }),
        )
        .route(
            "/api",
            aget(move |h: http::HeaderMap| {
                let ah = ah.clone();
                async move {
                    ah.fetch_add(1, Ordering::SeqCst);
                    let a = h
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if !a.starts_with("Bearer TOK66-")
                        || (refuse_first_token && a == "Bearer TOK66-1")
                    {
                        StatusCode::UNAUTHORIZED
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Wire {
        token_url: format!("http://{addr}/token"),
        api_url: format!("http://{addr}/api"),
        token_hits,
        api_hits,
    }
}

type Hyper = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn hyper() -> Hyper {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn kept_calls<S>(svc: &mut S, url: &str, n: usize) -> Vec<StatusCode>
where
    S: Service<Req, Response = Response<hyper::body::Incoming>>,
    S::Error: Into<BoxError>,
{
    let mut out = Vec::new();
    for _ in 0..n {
        let req = Request::get(url).body(Full::default()).unwrap();
        let res = svc
            .ready()
            .await
            .map_err(Into::into)
            .unwrap()
            .call(req)
            .await
            .map_err(Into::into)
            .unwrap();
        out.push(res.status());
    }
    out
}

/// Over the wire: `Auth` over and under `Buffer`, over `ConcurrencyLimit(1)`, driven by kept
/// services and clones in parallel; the API refuses the first token. Every call ends 200, the
/// token endpoint is asked twice, nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s66_wire_buffer_and_concurrency_limit_with_kept_services() {
    for order in 0..3 {
        let w = wire(true).await;
        let tokens = ClientCredentials::new(hyper(), &w.token_url, CLIENT_ID, SECRET)
            .unwrap()
            .with_request_timeout(secs(2));
        let layer = AuthLayer::oauth2(tokens).with_token_timeout(secs(3));
        let svc: tower::util::BoxCloneSyncService<Req, Response<hyper::body::Incoming>, BoxError> =
            match order {
                0 => tower::util::BoxCloneSyncService::new(
                    ServiceBuilder::new()
                        .buffer(4)
                        .layer(layer)
                        .concurrency_limit(1)
                        .service(hyper())
                        .map_err(Into::<BoxError>::into),
                ),
                1 => tower::util::BoxCloneSyncService::new(
                    ServiceBuilder::new()
                        .layer(layer)
                        .buffer(1)
                        .concurrency_limit(1)
                        .service(hyper())
                        .map_err(Into::<BoxError>::into),
                ),
                _ => tower::util::BoxCloneSyncService::new(
                    ServiceBuilder::new()
                        .concurrency_limit(1)
                        .buffer(2)
                        .layer(layer)
                        .service(hyper())
                        .map_err(Into::<BoxError>::into),
                ),
            };
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let mut s = svc.clone();
            let url = w.api_url.clone();
            tasks.push(tokio::spawn(
                async move { kept_calls(&mut s, &url, 5).await },
            ));
        }
        for t in tasks {
            let codes = within("kept calls", secs(10), t).await.unwrap();
            assert!(
                codes.iter().all(|c| *c == StatusCode::OK),
                "order {order}: {codes:?}"
            );
        }
        assert_eq!(w.token_hits.load(Ordering::SeqCst), 2, "order {order}");
        let api = w.api_hits.load(Ordering::SeqCst);
        assert!(
            (30..=36).contains(&api),
            "order {order}: {api} API requests"
        );
    }
}

/// In `ClientBuilder`: a token endpoint down (503) gives an error whose kind stays
/// `Server(503)`, that says it was the token endpoint's, `NotSent`, not the API's failure; the
/// composed client is `Clone + Send + Sync`; once the endpoint is back, the call works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s66_client_builder_with_a_token_endpoint_down_then_up() {
    use axum::routing::{get as aget, post};
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let d = down.clone();
    let app = axum::Router::new()
        .route(
            "/token",
            post(move || {
                let d = d.clone();
                async move {
                    if d.load(Ordering::SeqCst) {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            r#"{"error":"temporarily_unavailable"}"#.to_owned(),
                        )
                    } else {
                        (StatusCode::OK, tok(7, "3600"))
                    }
                }
            }),
        )
        .route(
            "/api",
            aget(|h: http::HeaderMap| async move {
                if h.get("authorization").map(|v| v == "Bearer TOK66-7") == Some(true) {
                    StatusCode::OK
                } else {
                    StatusCode::UNAUTHORIZED
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let tokens =
        ClientCredentials::new(hyper(), &format!("http://{addr}/token"), CLIENT_ID, SECRET)
            .unwrap();
    let client = sturdy::ClientBuilder::new()
        .without_retry()
        .with_attempt_timeout(secs(2))
        .with_auth(AuthLayer::oauth2(tokens))
        .build(hyper());
    fn css<T: Clone + Send + Sync>(_: &T) {}
    css(&client);
    let url = format!("http://{addr}/api");
    let req = || Request::get(&url).body(Full::default()).unwrap();
    let e = within("down", secs(5), client.clone().oneshot(req()))
        .await
        .unwrap_err();
    let se = sturdy::core::find::<sturdy::core::Error>(&*e).expect("a sturdy error");
    assert_eq!(
        *se.kind(),
        ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{}",
        chain(&*e)
    );
    assert!(e.to_string().contains("token endpoint"), "{}", chain(&*e));
    assert_eq!(
        sturdy::core::classify::delivery(&*e),
        sturdy::core::Delivery::NotSent,
        "{}",
        chain(&*e)
    );
    assert!(!chain(&*e).contains(SECRET));
    down.store(false, Ordering::SeqCst);
    // The source backs off 1 s after the failure.
    tokio::time::sleep(ms(1100)).await;
    let res = within("up", secs(5), client.clone().oneshot(req()))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}
