#![cfg(feature = "full")]
//! s112: an outside round on authentication (`sturdy::auth`, through `AuthLayer` and
//! `ClientBuilder`), on corners earlier rounds left: the "sent once more at once" rule for a
//! token request whose connection broke (through hyper-util, against raw TCP endpoints written
//! here: a close before the answer, a reset while the body is written, a pooled connection the
//! server closed; once, only then, within the same request timeout, shared by 20 callers; not for
//! a body cut mid-way, a stall, a refused connection, a status, or a retry layer that gave up),
//! every status a token endpoint may answer, the 64 KiB response bound exactly, the server's words
//! with control and non-ASCII characters, secrets echoed in every spelling (JSON specials, Basic),
//! the token URL's query and password through the error chains of hyper-util and reqwest, hostile
//! static credentials (blank, DEL, non-ASCII, huge), non-ASCII access tokens, hostile extra form
//! parameters and `audience` from both setters, the 401 replay at exactly the replay limit and
//! with trailers, the refusal hold after an accepted token, a token client never ready, a zero
//! token timeout with a due token, the backoff starting over after a success, a background
//! refresh lost with its runtime, event and metric hosts in lower case with ports as written,
//! `Buffer` and `ConcurrencyLimit(1)` with kept services cut by tower's `Timeout` and by aborts at
//! every 3 ms, `ClientBuilder`'s attempt timeout after a token wait, and the real
//! `oauth2-mock-server` started here on 127.0.0.1. Paused time for expiry and backoff; sockets in
//! real time with millisecond settings.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, ClientCredentials, ExposeSecret};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, ErrorKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Service, ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

const SECRET: &str = "S112-secret-Qw7Zk9Lp3Xv";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn within<F: Future>(what: &str, d: Duration, f: F) -> F::Output {
    match tokio::time::timeout(d, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {d:?}"),
    }
}

async fn get(cc: &ClientCredentials) -> Result<sturdy::auth::Token, BoxError> {
    cc.get().await.map_err(Into::into)
}

/// Lets spawned tasks (a token request) run after the paused clock moved.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn err_of(e: &BoxError) -> &sturdy::core::Error {
    e.downcast_ref::<sturdy::core::Error>()
        .unwrap_or_else(|| panic!("not a sturdy_core::Error: {e:?}"))
}

fn all_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(" | ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

type Hyper = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn hyper_client() -> Hyper {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// What a raw token endpoint does with connection `n` (from 1), once it read the request.
#[derive(Clone, Debug)]
enum Act {
    /// Close the connection without a byte.
    Close,
    /// Wait, then close without a byte.
    CloseAfter(Duration),
    /// Send these bytes, then close.
    Send(Vec<u8>),
    /// Never answer (hold the connection).
    Stall,
    /// Reset the connection (linger 0) as soon as the request head arrived, body unread.
    ResetAtHead,
}

fn ok_answer(token: &str) -> Act {
    let body = format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":3600}}"#);
    Act::Send(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// A token endpoint on raw TCP: counts connections and the requests read whole.
struct Raw {
    url: String,
    conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}
impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}
impl Raw {
    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

async fn raw_endpoint(script: impl Fn(usize) -> Act + Send + Sync + 'static) -> Raw {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    let script = Arc::new(script);
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            let act = script(n);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = Vec::new();
                if matches!(act, Act::ResetAtHead) {
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => got.extend_from_slice(&buf[..k]),
                        }
                    }
                    // Linger 0: a reset, not a FIN (it does not block: nothing is left to send).
                    #[allow(deprecated)]
                    let _ = conn.set_linger(Some(Duration::ZERO));
                    drop(conn);
                    return;
                }
                // Read the head and the body (content-length).
                loop {
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse::<usize>().unwrap())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                }
                match act {
                    Act::Close => {}
                    Act::CloseAfter(d) => tokio::time::sleep(d).await,
                    Act::Send(bytes) => {
                        let _ = conn.write_all(&bytes).await;
                        let _ = conn.flush().await;
                    }
                    Act::Stall => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    Act::ResetAtHead => unreachable!(),
                }
                drop(conn);
            });
        }
    });
    Raw {
        url: format!("http://{addr}/oauth/token"),
        conns,
        task,
    }
}

fn raw_creds(raw: &Raw) -> ClientCredentials {
    ClientCredentials::new(hyper_client(), &raw.url, "c112", SECRET)
        .unwrap()
        .with_request_timeout(ms(400))
}

// ---------------------------------------------------------------------------------------------
// The connection broke under the token request: sent once more at once, and only then.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn s112_a_connection_closed_before_the_answer_is_resent_once_through_hyper() {
    let raw = raw_endpoint(|n| {
        if n == 1 {
            Act::Close
        } else {
            ok_answer("tok-2")
        }
    })
    .await;
    let failed = Arc::new(AtomicUsize::new(0));
    let f = failed.clone();
    let cc = raw_creds(&raw).on_event(move |e| {
        if matches!(e, Event::TokenFailed { .. }) {
            f.fetch_add(1, Ordering::SeqCst);
        }
    });
    let t = within("get", ms(3000), get(&cc)).await.unwrap();
    assert_eq!(t.secret().expose_secret(), "tok-2");
    assert_eq!(raw.conns(), 2, "one resend");
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "the resend is not a failed request"
    );
}

#[tokio::test]
async fn s112_a_connection_closed_every_time_is_resent_only_once_then_backs_off() {
    let raw = raw_endpoint(|_| Act::Close).await;
    let cc = raw_creds(&raw);
    let e = within("get", ms(3000), get(&cc)).await.unwrap_err();
    let err = e
        .downcast_ref::<sturdy::core::Error>()
        .unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(raw.conns(), 2, "sent once and once more, not a third time");
    assert!(err.is_retryable(), "{err}");
    let text = all_text(&*e);
    assert!(text.contains(&raw.url), "names the endpoint: {text}");
    assert!(!text.contains(SECRET), "{text}");
    // During the backoff, the next caller gets the last error at once: no new connection.
    let e2 = within("get in backoff", ms(200), get(&cc))
        .await
        .unwrap_err();
    assert!(e2.downcast_ref::<sturdy::core::Error>().is_some());
    assert_eq!(raw.conns(), 2, "no request during the backoff");
}

#[tokio::test]
async fn s112_the_resend_runs_within_the_same_request_timeout() {
    // The first connection is closed after 300 ms, the second never answers: the request as a
    // whole ends at its 400 ms timeout, not 300 + 400.
    let raw = raw_endpoint(|n| {
        if n == 1 {
            Act::CloseAfter(ms(300))
        } else {
            Act::Stall
        }
    })
    .await;
    let cc = raw_creds(&raw);
    let t0 = tokio::time::Instant::now();
    let e = within("get", ms(3000), get(&cc)).await.unwrap_err();
    let took = t0.elapsed();
    assert_eq!(err_of(&e).kind(), &ErrorKind::Timeout, "{e}");
    assert_eq!(raw.conns(), 2);
    assert!(
        took < ms(680),
        "the resend shares the 400 ms request timeout; took {took:?}"
    );
}

#[tokio::test]
async fn s112_a_stalled_token_request_is_not_resent() {
    let raw = raw_endpoint(|_| Act::Stall).await;
    let cc = raw_creds(&raw);
    let e = within("get", ms(3000), get(&cc)).await.unwrap_err();
    assert_eq!(err_of(&e).kind(), &ErrorKind::Timeout, "{e}");
    tokio::time::sleep(ms(100)).await;
    assert_eq!(raw.conns(), 1, "a timeout is not resent");
}

#[tokio::test]
async fn s112_a_body_cut_mid_way_is_an_answer_and_not_resent() {
    // A 200 whose body stops after 20 of its 90 promised bytes, then the connection closes.
    let raw = raw_endpoint(|_| {
        Act::Send(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 90\r\n\r\n{\"access_token\":\"tok"
                .to_vec(),
        )
    })
    .await;
    let cc = raw_creds(&raw);
    let e = within("get", ms(3000), get(&cc)).await.unwrap_err();
    let text = all_text(&*e);
    assert!(text.contains(&raw.url), "names the endpoint: {text}");
    assert!(!text.contains(SECRET));
    tokio::time::sleep(ms(100)).await;
    assert_eq!(
        raw.conns(),
        1,
        "an answer of any status is not resent: {text}"
    );
}

#[tokio::test]
async fn s112_a_status_answer_is_not_resent_over_the_wire() {
    let body = r#"{"error":"temporarily_unavailable"}"#;
    let raw = raw_endpoint(move |_| {
        Act::Send(
            format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    })
    .await;
    let cc = raw_creds(&raw);
    let e = within("get", ms(3000), get(&cc)).await.unwrap_err();
    assert_eq!(
        err_of(&e).kind(),
        &ErrorKind::Server(http::StatusCode::SERVICE_UNAVAILABLE),
        "{e}"
    );
    tokio::time::sleep(ms(100)).await;
    assert_eq!(raw.conns(), 1);
}

#[tokio::test]
async fn s112_a_retry_layer_of_the_token_client_that_gave_up_is_not_resent() {
    use sturdy::retry::{Backoff, RetryLayer};
    let raw = raw_endpoint(|_| Act::Close).await;
    let client = sturdy::ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_max_attempts(3)
                .with_seed(112)
                .with_backoff(Backoff::exponential(ms(5), ms(10)).unwrap()),
        )
        .without_circuit_breaker()
        .without_rate_limit()
        .build(hyper_client());
    let cc = ClientCredentials::new(client, &raw.url, "c112", SECRET)
        .unwrap()
        .with_request_timeout(ms(2000));
    let e = within("get", ms(4000), get(&cc)).await.unwrap_err();
    let text = all_text(&*e);
    assert!(!text.contains(SECRET));
    tokio::time::sleep(ms(100)).await;
    assert_eq!(
        raw.conns(),
        3,
        "three attempts by the client's retry layer, none more by the source: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Every status from the token endpoint.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_every_status_from_the_token_endpoint_is_named_classified_and_sent_once() {
    let retryable: HashSet<u16> = [500, 502, 503, 504, 429, 425, 408].into_iter().collect();
    let url = "https://auth.s112.test/oauth/token";
    let mut wrong = Vec::new();
    for status in (300u16..=599).chain([201, 202, 203, 204, 206]) {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let svc = tower::service_fn(move |_req: Req| {
            h.fetch_add(1, Ordering::SeqCst);
            async move {
                let body = if status < 300 {
                    Full::<Bytes>::from(r#"{"token_type":"Bearer"}"#)
                } else {
                    Full::<Bytes>::from(r#"{"error":"server_error"}"#)
                };
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(body)
                        .unwrap(),
                )
            }
        });
        let cc = ClientCredentials::new(svc, url, "c112", SECRET).unwrap();
        let Err(e) = get(&cc).await else {
            wrong.push(format!("{status}: a token"));
            continue;
        };
        let err = err_of(&e);
        let msg = err.to_string();
        if !msg.contains(url) {
            wrong.push(format!("{status}: does not name the endpoint: {msg}"));
        }
        if msg.contains(SECRET) {
            wrong.push(format!("{status}: the secret"));
        }
        if status >= 300 {
            let want = retryable.contains(&status);
            if err.is_retryable() != want {
                wrong.push(format!(
                    "{status}: retryable {} ({:?}): {msg}",
                    err.is_retryable(),
                    err.kind()
                ));
            }
        }
        if hits.load(Ordering::SeqCst) != 1 {
            wrong.push(format!(
                "{status}: {} requests",
                hits.load(Ordering::SeqCst)
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

// ---------------------------------------------------------------------------------------------
// The server's words: control characters escaped, non-ASCII cut on a character.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_server_words_with_control_and_non_ascii_characters_are_escaped_and_cut() {
    let url = "https://auth.s112.test/oauth/token";
    let descr = format!(
        "line1\nFORGED line\r\u{1b}[31mred\u{7f}del\u{85}nel\u{0}nul\t{}",
        "é".repeat(300)
    );
    let code = format!("invalid_\u{1b}]0;title\u{7}{}", "ü".repeat(100));
    let body = serde_json::json!({ "error": code, "error_description": descr }).to_string();
    let svc = tower::service_fn(move |_req: Req| {
        let body = body.clone();
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(400)
                    .header("content-type", "application/json")
                    .body(Full::<Bytes>::from(body))
                    .unwrap(),
            )
        }
    });
    let cc = ClientCredentials::new(svc, url, "c112", SECRET).unwrap();
    let e = get(&cc).await.unwrap_err();
    let msg = err_of(&e).to_string();
    let controls: Vec<char> = msg.chars().filter(|c| c.is_control()).collect();
    assert!(
        controls.is_empty(),
        "raw control characters {controls:?} in: {msg:?}"
    );
    assert!(msg.contains(url), "{msg}");
    assert!(msg.contains("line1"), "{msg}");
    // Cut to 200 characters of the description and 64 of the code: far fewer é and ü than sent.
    let e_count = msg.chars().filter(|c| *c == 'é').count();
    let u_count = msg.chars().filter(|c| *c == 'ü').count();
    assert!(e_count > 0 && e_count <= 200, "{e_count} é in {msg}");
    assert!(u_count <= 64, "{u_count} ü in {msg}");
}

#[tokio::test(start_paused = true)]
async fn s112_a_non_ascii_secret_echoed_in_every_spelling_is_redacted() {
    let secret = "sé-crêt/Ω+9 Zk&ü=7";
    let url = "https://auth.s112.test/oauth/token";
    // As written, percent-encoded (upper and lower hex), with `+` for space.
    let enc_upper: String = secret
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let enc_lower: String = secret
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02x}")
            }
        })
        .collect();
    let plus = secret.replace(' ', "+");
    for echoed in [secret.to_string(), enc_upper, enc_lower, plus] {
        let descr = format!("bad client_secret={echoed} given");
        let body = serde_json::json!({ "error": "invalid_client", "error_description": descr })
            .to_string();
        let svc = tower::service_fn(move |_req: Req| {
            let body = body.clone();
            async move {
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(401)
                        .header("content-type", "application/json")
                        .body(Full::<Bytes>::from(body))
                        .unwrap(),
                )
            }
        });
        let cc = ClientCredentials::new(svc, url, "c112", secret).unwrap();
        let e = get(&cc).await.unwrap_err();
        let text = all_text(&*e) + &format!("{e:?}");
        assert!(!text.contains(&echoed), "{echoed:?} in {text}");
        assert!(!text.contains("crêt"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
        assert!(!err_of(&e).is_retryable());
    }
}

// ---------------------------------------------------------------------------------------------
// Static credentials with hostile values.
// ---------------------------------------------------------------------------------------------

fn config_err(r: Result<AuthLayer, sturdy::core::Error>, secret: &str, what: &str) {
    match r {
        Ok(_) => panic!("{what}: built"),
        Err(e) => {
            assert_eq!(e.kind(), &ErrorKind::Config, "{what}: {e}");
            let text = format!("{e} {e:?}");
            if secret.trim().len() >= 4 {
                assert!(
                    !text.contains(secret.trim()),
                    "{what}: quotes the secret: {text}"
                );
            }
        }
    }
}

#[test]
fn s112_blank_and_unsendable_static_credentials_are_config_errors() {
    let xkey = HeaderName::from_static("x-api-key");
    for blank in [" ", "\t", " \t \t", "\t\t\t\t\t\t\t\t"] {
        config_err(AuthLayer::bearer(blank), blank, "blank bearer");
        config_err(
            AuthLayer::api_key(xkey.clone(), blank),
            blank,
            "blank api key",
        );
        config_err(
            AuthLayer::api_key_query("k", blank),
            blank,
            "blank query key",
        );
    }
    for bad in [
        "abcd\u{7f}efgh",
        "abcd\u{0}efgh",
        "abcd\nefgh",
        "abcd\u{1b}efgh",
    ] {
        config_err(AuthLayer::bearer(bad), bad, "bearer with a control");
        config_err(
            AuthLayer::api_key(xkey.clone(), bad),
            bad,
            "api key with a control",
        );
    }
    config_err(
        AuthLayer::api_key_query("", "k1234"),
        "k1234",
        "empty param",
    );
    config_err(
        AuthLayer::basic("us:er", "pw-s112-x"),
        "pw-s112-x",
        "basic colon",
    );
}

async fn seen_headers(layer: AuthLayer, uri: &str) -> (HeaderMap, http::Uri) {
    let got = Arc::new(Mutex::new(None));
    let g = got.clone();
    let api = tower::service_fn(move |req: Req| {
        *g.lock().unwrap() = Some((req.headers().clone(), req.uri().clone()));
        async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())) }
    });
    let svc = ServiceBuilder::new().layer(layer).service(api);
    let res = svc
        .oneshot(Request::get(uri).body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v = got.lock().unwrap().take().unwrap();
    v
}

fn b64_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
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

#[tokio::test]
async fn s112_huge_and_non_ascii_static_credentials() {
    // A 1 MiB bearer token goes out whole and sensitive.
    let big = "A".repeat(1 << 20);
    let (h, _) = seen_headers(
        AuthLayer::bearer(big.clone()).unwrap(),
        "http://a.s112.test/",
    )
    .await;
    let v = &h["authorization"];
    assert!(v.is_sensitive());
    assert_eq!(v.len(), 7 + big.len());
    // Basic with non-ASCII and control characters in the password: base64 carries them.
    let pw = "pä\u{1}ss\tw😀rd";
    let (h, _) = seen_headers(AuthLayer::basic("ünï", pw).unwrap(), "http://a.s112.test/").await;
    let v = h["authorization"].to_str().unwrap();
    assert!(h["authorization"].is_sensitive());
    let dec = b64_decode(v.strip_prefix("Basic ").unwrap());
    // RFC 6749 §2.3.1 is for OAuth clients; plain Basic (RFC 7617) sends user:password as UTF-8.
    // Either way the password must come back whole.
    let text = String::from_utf8(dec).unwrap();
    assert!(
        text == format!("ünï:{pw}") || text.contains("%"),
        "decoded: {text:?}"
    );
    // An empty Basic password is allowed.
    let (h, _) = seen_headers(
        AuthLayer::basic("key-s112", "").unwrap(),
        "http://a.s112.test/",
    )
    .await;
    let dec = b64_decode(
        h["authorization"]
            .to_str()
            .unwrap()
            .strip_prefix("Basic ")
            .unwrap(),
    );
    assert_eq!(dec, b"key-s112:");
    // A non-ASCII API key in the query is percent-encoded and decodes back.
    let key = "kë y&=#+/😀";
    let (_, uri) = seen_headers(
        AuthLayer::api_key_query("api_key", key).unwrap(),
        "http://a.s112.test/p?x=1",
    )
    .await;
    let q = uri.query().unwrap();
    assert!(q.is_ascii(), "{q}");
    let mut found = Vec::new();
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "api_key" {
            found.push(pct_decode(v));
        }
    }
    assert_eq!(found, vec![key.to_string()], "query {q}");
    assert!(q.starts_with("x=1&") || q.ends_with("&x=1"), "{q}");
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn s112_non_ascii_bearer_is_refused_or_sent_byte_exact() {
    // "a value that cannot go in a header" is a Config error; UTF-8 bytes can go in one as
    // obs-text. Either is acceptable, but never a panic nor a changed value.
    let tok = "tökén-s112-Ω";
    match AuthLayer::bearer(tok) {
        Err(e) => {
            assert_eq!(e.kind(), &ErrorKind::Config);
            assert!(!format!("{e} {e:?}").contains(tok));
        }
        Ok(layer) => {
            let (h, _) = seen_headers(layer, "http://a.s112.test/").await;
            assert_eq!(
                h["authorization"].as_bytes(),
                format!("Bearer {tok}").as_bytes()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The 401 replay: at exactly the limit, and with trailers.
// ---------------------------------------------------------------------------------------------

/// A token source whose n-th token is `T-n`, counting fetches.
#[derive(Debug, Default)]
struct Counting {
    n: AtomicUsize,
    current: Mutex<Option<sturdy::auth::Token>>,
}
impl sturdy::auth::TokenSource for Counting {
    fn token(&self) -> sturdy::auth::BoxFuture<Result<sturdy::auth::Token, BoxError>> {
        let mut cur = self.current.lock().unwrap();
        if cur.is_none() {
            let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
            *cur = Some(sturdy::auth::Token::new(format!("T-{n}"), None));
        }
        let t = cur.clone().unwrap();
        Box::pin(async move { Ok(t) })
    }
    fn invalidate(&self, token: &sturdy::auth::Token) {
        let mut cur = self.current.lock().unwrap();
        if cur.as_ref().is_some_and(|c| c.same_value(token)) {
            *cur = None;
        }
    }
}

/// An API that answers 401 to `T-1` and 200 otherwise, recording each body's length.
fn first_token_refused(
    bodies: Arc<Mutex<Vec<(String, usize)>>>,
) -> impl Service<Req, Response = Res, Error = BoxError, Future: Send> + Clone + Send {
    tower::service_fn(move |req: Req| {
        let bodies = bodies.clone();
        async move {
            let auth = req.headers()["authorization"].to_str().unwrap().to_string();
            let len = req.into_body().collect().await?.to_bytes().len();
            bodies.lock().unwrap().push((auth.clone(), len));
            let status = if auth == "Bearer T-1" { 401 } else { 200 };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::default())
                    .unwrap(),
            )
        }
    })
}

#[tokio::test]
async fn s112_a_body_of_exactly_the_replay_limit_is_replayed_and_one_byte_more_is_not() {
    for (len, replayed) in [(1usize << 20, true), ((1 << 20) + 1, false)] {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let src = Arc::new(Counting::default());
        let svc = ServiceBuilder::new()
            .layer(AuthLayer::token_source(src.clone()))
            .service(first_token_refused(bodies.clone()));
        let req = Request::post("http://api.s112.test/up")
            .body(Full::from(vec![b'x'; len]))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        let seen = bodies.lock().unwrap().clone();
        if replayed {
            assert_eq!(res.status(), 200, "{len}");
            assert_eq!(
                seen,
                vec![("Bearer T-1".into(), len), ("Bearer T-2".into(), len)]
            );
        } else {
            assert_eq!(res.status(), 401, "{len}");
            assert_eq!(seen, vec![("Bearer T-1".into(), len)]);
        }
    }
}

/// A body of `data` then trailers, with an exact size hint when `exact`.
struct Trailed {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    exact: bool,
    len: u64,
}
impl http_body::Body for Trailed {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(d))));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(t))));
        }
        Poll::Ready(None)
    }
    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        if self.exact {
            http_body::SizeHint::with_exact(if self.data.is_some() { self.len } else { 0 })
        } else {
            http_body::SizeHint::default()
        }
    }
}

impl From<Bytes> for Trailed {
    fn from(b: Bytes) -> Self {
        let len = b.len() as u64;
        Self {
            data: Some(b),
            trailers: None,
            exact: true,
            len,
        }
    }
}

fn trailed(exact: bool) -> Request<Trailed> {
    let mut t = HeaderMap::new();
    t.insert("x-checksum", "c112".parse().unwrap());
    Request::post("http://api.s112.test/up")
        .body(Trailed {
            data: Some(Bytes::from_static(b"hello")),
            trailers: Some(t),
            exact,
            len: 5,
        })
        .unwrap()
}

#[tokio::test]
async fn s112_a_known_size_body_with_trailers_fails_unsent_and_an_unknown_size_one_keeps_them() {
    // The layer's inner body type is its own: drive it through a generic API instead.
    let src = Arc::new(Counting::default());
    // Pre-fetch T-1 so the API (which accepts everything) sees T-1.
    let seen = Arc::new(Mutex::new(Vec::<(bool, Option<String>)>::new()));
    let s2 = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::token_source(src))
        .service(tower::service_fn(move |req: Request<_>| {
            let s2 = s2.clone();
            async move { trailers_api(req, s2).await }
        }));
    let e = svc.clone().oneshot(trailed(true)).await.unwrap_err();
    assert_eq!(err_of(&e).kind(), &ErrorKind::Body, "{e}");
    assert_eq!(
        sturdy::core::classify::delivery(&*e),
        sturdy::core::Delivery::NotSent
    );
    assert!(seen.lock().unwrap().is_empty(), "not sent");
    let res = svc.oneshot(trailed(false)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(true, Some("c112".to_string()))],
        "an unknown-size body keeps its trailers"
    );
}

async fn trailers_api<B>(
    req: Request<B>,
    seen: Arc<Mutex<Vec<(bool, Option<String>)>>>,
) -> Result<Res, BoxError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let col = req.into_body().collect().await.map_err(Into::into)?;
    let t = col
        .trailers()
        .and_then(|t| t.get("x-checksum"))
        .map(|v| v.to_str().unwrap().to_string());
    seen.lock().unwrap().push((true, t));
    Ok(Response::new(Full::default()))
}

// ---------------------------------------------------------------------------------------------
// Events: hosts in lower case.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_event_hosts_are_lower_case_for_the_token_endpoint_and_the_api() {
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let ev = events.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let token_ep = tower::service_fn(move |_req: Req| {
        let k = n2.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let (status, body) = if k == 1 {
                (503, r#"{"error":"temporarily_unavailable"}"#.to_string())
            } else {
                (
                    200,
                    format!(r#"{{"access_token":"E-{k}","token_type":"Bearer","expires_in":600}}"#),
                )
            };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::<Bytes>::from(body))
                    .unwrap(),
            )
        }
    });
    let record = move |e: &Event<'_>| {
        let s = match e {
            Event::TokenFetched { endpoint, .. } => format!("fetched {endpoint}"),
            Event::TokenFailed {
                endpoint,
                retry_in,
                keeping_current,
                ..
            } => format!("failed {endpoint} {retry_in:?} {keeping_current}"),
            Event::TokenRejected { host } => format!("rejected {host}"),
            _ => return,
        };
        ev.lock().unwrap().push(s);
    };
    let record = Arc::new(record);
    let r1 = record.clone();
    let cc = ClientCredentials::new(
        token_ep,
        "https://AUTH.S112.Example:8443/OAuth/Token",
        "c112",
        SECRET,
    )
    .unwrap()
    .on_event(move |e| r1(e));
    let api_calls = Arc::new(AtomicUsize::new(0));
    let a = api_calls.clone();
    let api = tower::service_fn(move |_req: Req| {
        let k = a.fetch_add(1, Ordering::SeqCst);
        async move {
            let status = if k == 0 || k == 2 { 401 } else { 200 };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let r2 = record.clone();
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(cc).on_event(move |e| r2(e)))
        .service(api);
    // First call: the endpoint's 503 fails it.
    let e = svc
        .clone()
        .oneshot(
            Request::get("https://API.S112.Example/x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err_of(&e).kind(),
        &ErrorKind::Server(http::StatusCode::SERVICE_UNAVAILABLE)
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    // Second call: token E-2, a 401 from an upper-case absolute URI, then E-3 and a 200.
    let res = svc
        .clone()
        .oneshot(
            Request::get("https://API.S112.Example/x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Third call: a relative URI with an upper-case Host header and port, and a 401 to E-3
    // (which the API accepted before: replaced at once).
    let res = svc
        .oneshot(
            Request::get("/y")
                .header("host", "API2.S112.Example:8080")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let got = events.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![
            "failed auth.s112.example:8443 1s false".to_string(),
            "fetched auth.s112.example:8443".to_string(),
            "rejected api.s112.example".to_string(),
            "fetched auth.s112.example:8443".to_string(),
            "rejected api2.s112.example:8080".to_string(),
            "fetched auth.s112.example:8443".to_string(),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Composition: Buffer over Auth over ConcurrencyLimit(1), a kept service, tower's Timeout.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_a_timed_out_token_wait_in_a_kept_buffered_limited_stack_frees_its_permit() {
    // The token endpoint answers after 5 s the first time, at once after.
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let token_ep = tower::service_fn(move |_req: Req| {
        let k = n2.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if k == 1 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            let body =
                format!(r#"{{"access_token":"K-{k}","token_type":"Bearer","expires_in":100}}"#);
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(body)))
        }
    });
    let cc = ClientCredentials::new(token_ep, "https://auth.s112.test/t", "c112", SECRET).unwrap();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let (f, s) = (in_flight.clone(), seen.clone());
    let api = tower::service_fn(move |req: Req| {
        let (f, s) = (f.clone(), s.clone());
        async move {
            assert_eq!(f.fetch_add(1, Ordering::SeqCst), 0, "limit of one");
            s.lock()
                .unwrap()
                .push(req.headers()["authorization"].to_str().unwrap().to_string());
            tokio::time::sleep(ms(10)).await;
            f.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        }
    });
    let inner = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(cc).with_token_timeout(Duration::from_secs(30)))
        .concurrency_limit(1)
        .service(api);
    let mut svc = ServiceBuilder::new()
        .buffer(1)
        .timeout(Duration::from_secs(1))
        .service(inner);
    let req = || {
        Request::get("https://api.s112.test/k")
            .body(Full::default())
            .unwrap()
    };
    // 1: times out after 1 s, waiting for the token.
    let e = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    assert!(e.is::<tower::timeout::error::Elapsed>(), "{e}");
    // 2: the token request goes on; the call after it gets K-1 through the same kept service.
    let e = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    assert!(e.is::<tower::timeout::error::Elapsed>(), "{e}");
    tokio::time::advance(Duration::from_secs(4)).await;
    for _ in 0..3 {
        let res = svc.ready().await.unwrap().call(req()).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(n.load(Ordering::SeqCst), 1, "one token request");
    assert_eq!(*seen.lock().unwrap(), vec!["Bearer K-1"; 3]);
    // Expiry on paused time: at 100 - 50 s the refresh goes in the background, the call goes on.
    tokio::time::advance(Duration::from_secs(60)).await;
    let res = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(res.status(), 200);
    tokio::task::yield_now().await;
    tokio::time::advance(ms(1)).await;
    let res = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(n.load(Ordering::SeqCst), 2);
    let s = seen.lock().unwrap().clone();
    assert_eq!(
        s[3], "Bearer K-1",
        "the still-valid token during the refresh"
    );
    assert_eq!(s[4], "Bearer K-2");
}

// ---------------------------------------------------------------------------------------------
// The real oauth2-mock-server.
// ---------------------------------------------------------------------------------------------

const NODE_SCRIPT: &str = r#"
const { OAuth2Server } = require('oauth2-mock-server');
(async () => {
  const server = new OAuth2Server();
  await server.issuer.keys.generate('RS256');
  let n = 0;
  server.service.on('beforeResponse', (response, req) => {
    n += 1;
    const b = req.body || {};
    const auth = req.headers.authorization || '';
    const d = Buffer.from(auth.slice(6).trim(), 'base64').toString('utf8');
    if (!d.endsWith(':' + process.env.S112_SECRET)) {
      response.statusCode = 401;
      response.body = { error: 'invalid_client', error_description: 'bad: ' + d + '\n\u001b[2Jx' };
    }
    response.headers = Object.assign({}, response.headers || {}, { 'x-count': String(n) });
  });
  await server.start(0, '127.0.0.1');
  console.log(server.address().port);
})();
"#;

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
        .env("S112_SECRET", SECRET)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s112_real_server_tokens_events_and_a_refusal_with_control_characters() {
    let Some(node) = start_oauth_server() else {
        return;
    };
    let fetched = Arc::new(Mutex::new(Vec::<String>::new()));
    let f = fetched.clone();
    let cc = ClientCredentials::new(hyper_client(), &node.url, "client-s112", SECRET)
        .unwrap()
        .with_scopes(["a:b"])
        .with_request_timeout(ms(2000))
        .on_event(move |e| {
            if let Event::TokenFetched { endpoint, .. } = e {
                f.lock().unwrap().push(endpoint.to_string());
            }
        });
    let api_hits = Arc::new(AtomicUsize::new(0));
    let a = api_hits.clone();
    let api = tower::service_fn(move |req: Req| {
        a.fetch_add(1, Ordering::SeqCst);
        async move {
            let v = req.headers()["authorization"].to_str().unwrap().to_string();
            assert!(v.starts_with("Bearer ey"), "a JWT");
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        }
    });
    let svc = ServiceBuilder::new()
        .buffer(8)
        .layer(AuthLayer::oauth2(cc).with_token_timeout(ms(2000)))
        .concurrency_limit(1)
        .service(api);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get("http://api.s112.test/")
                .body(Full::default())
                .unwrap();
            s.ready().await?.call(req).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(api_hits.load(Ordering::SeqCst), 16);
    let port = node
        .url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    assert_eq!(*fetched.lock().unwrap(), vec![format!("127.0.0.1:{port}")]);

    // A wrong secret: the server's words carry a newline and an escape, and echo the request.
    let wrong = "wrong-s112-secret-Hh5";
    let cc = ClientCredentials::new(hyper_client(), &node.url, "client-s112", wrong)
        .unwrap()
        .with_request_timeout(ms(2000));
    let e = within("wrong secret", ms(3000), get(&cc))
        .await
        .unwrap_err();
    let err = err_of(&e);
    let msg = err.to_string();
    assert!(!err.is_retryable(), "{msg}");
    assert!(msg.contains("invalid_client"), "{msg}");
    assert!(msg.contains(&node.url), "{msg}");
    assert!(!msg.contains(wrong), "{msg}");
    assert!(!msg.chars().any(|c| c.is_control()), "{msg:?}");
}

// ---------------------------------------------------------------------------------------------
// The 64 KiB token response bound, exactly, over the wire (with and without a length).
// ---------------------------------------------------------------------------------------------

fn padded_token_body(total: usize) -> String {
    let head = r#"{"access_token":"tok-64k","token_type":"Bearer","expires_in":3600}"#;
    // JSON allows trailing whitespace.
    format!("{head}{}", " ".repeat(total - head.len()))
}

fn answer_with(body: &str, chunked: bool) -> Act {
    let mut out = Vec::new();
    if chunked {
        out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        );
        for part in body.as_bytes().chunks(1000) {
            out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            out.extend_from_slice(part);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
    } else {
        out.extend_from_slice(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(body.as_bytes());
    }
    Act::Send(out)
}

#[tokio::test]
async fn s112_a_token_response_of_exactly_64_kib_is_read_and_one_byte_more_is_not() {
    for chunked in [false, true] {
        for (total, fits) in [(64 * 1024, true), (64 * 1024 + 1, false)] {
            let body = padded_token_body(total);
            let raw = raw_endpoint(move |_| answer_with(&body, chunked)).await;
            let cc = raw_creds(&raw);
            let r = within("get", ms(3000), get(&cc)).await;
            match (r, fits) {
                (Ok(t), true) => assert_eq!(t.secret().expose_secret(), "tok-64k"),
                (Err(e), false) => {
                    let text = all_text(&*e);
                    assert!(text.contains(&raw.url), "{text}");
                    assert!(
                        text.contains("64") || text.to_lowercase().contains("large"),
                        "says why: {text}"
                    );
                }
                (Ok(_), false) => panic!("{total} bytes (chunked {chunked}) accepted"),
                (Err(e), true) => panic!("{total} bytes (chunked {chunked}) refused: {e}"),
            }
            assert_eq!(raw.conns(), 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the wire failures say.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn s112_wire_failures_name_the_endpoint_and_the_cause() {
    let cases: Vec<(&str, Act, &[&str])> = vec![
        (
            "closed",
            Act::Close,
            &["clos", "connection", "reset", "broke"],
        ),
        ("stall", Act::Stall, &["400ms", "within", "time"]),
        (
            "cut",
            Act::Send(
                b"HTTP/1.1 200 OK\r\ncontent-length: 90\r\n\r\n{\"access_token\":\"tok".to_vec(),
            ),
            &["body", "closed", "incomplete", "before", "clos"],
        ),
        (
            "garbage",
            Act::Send(b"NOT HTTP AT ALL\r\n\r\n".to_vec()),
            &["invalid", "http", "parse", "malformed", "response"],
        ),
    ];
    let mut bad = Vec::new();
    for (name, act, words) in cases {
        let raw = raw_endpoint(move |_| act.clone()).await;
        let cc = raw_creds(&raw);
        let e = within(name, ms(3000), get(&cc)).await.unwrap_err();
        let msg = err_of(&e).to_string();
        println!("{name}: {:?}: {msg}", err_of(&e).kind());
        if !msg.contains(&raw.url) {
            bad.push(format!("{name}: no endpoint: {msg}"));
        }
        let low = msg.to_lowercase();
        if !words.iter().any(|w| low.contains(w)) {
            bad.push(format!("{name}: no cause: {msg}"));
        }
        if msg.contains(SECRET) || msg.chars().any(|c| c.is_control()) {
            bad.push(format!("{name}: {msg:?}"));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

#[tokio::test(start_paused = true)]
async fn s112_non_json_bodies_with_control_characters_are_not_quoted_raw() {
    let url = "https://auth.s112.test/oauth/token";
    for (status, ctype, body) in [
        (
            200u16,
            "text/html",
            "<html>\u{1b}[2J\r\nFORGED: ok\u{7}</html>",
        ),
        (500, "text/plain", "oops\nFORGED line\u{1b}]0;x\u{7}"),
        (200, "application/json", "{\"access_token\":\"a\u{1}b\"}"),
        (400, "application/json", "[\"\u{1b}\"]"),
    ] {
        let svc = tower::service_fn(move |_req: Req| async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .header("content-type", ctype)
                    .body(Full::<Bytes>::from(body))
                    .unwrap(),
            )
        });
        let cc = ClientCredentials::new(svc, url, "c112", SECRET).unwrap();
        let e = get(&cc).await.unwrap_err();
        let msg = all_text(&*e);
        assert!(msg.contains(url), "{msg}");
        assert!(
            !msg.chars().any(|c| c.is_control()),
            "{status} {ctype}: {msg:?}"
        );
        assert!(!msg.contains("\nFORGED"), "{msg:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Extra form parameters with hostile values.
// ---------------------------------------------------------------------------------------------

fn form_decode(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn s112_hostile_extra_params_go_out_exactly_once_each() {
    let bodies = Arc::new(Mutex::new(Vec::<String>::new()));
    let b = bodies.clone();
    let svc = tower::service_fn(move |req: Req| {
        let b = b.clone();
        async move {
            let body = req.into_body().collect().await?.to_bytes();
            b.lock()
                .unwrap()
                .push(String::from_utf8(body.to_vec()).unwrap());
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(
                r#"{"access_token":"p","token_type":"Bearer","expires_in":60}"#,
            )))
        }
    });
    let big = "R".repeat(20_000);
    let cc = ClientCredentials::new(svc, "https://auth.s112.test/t", "c112", SECRET)
        .unwrap()
        .with_param("resource", "https://api.s112.test/a?b=c&d=e#f")
        .unwrap()
        .with_param("resource", "ünï😀 +%")
        .unwrap()
        .with_param("we&ird=name", "x\ny\r\u{0}z")
        .unwrap()
        .with_param("big", big.clone())
        .unwrap();
    get(&cc).await.unwrap();
    let sent = bodies.lock().unwrap()[0].clone();
    let pairs = form_decode(&sent);
    let want = [
        ("resource", "https://api.s112.test/a?b=c&d=e#f"),
        ("resource", "ünï😀 +%"),
        ("we&ird=name", "x\ny\r\u{0}z"),
        ("big", big.as_str()),
    ];
    for (k, v) in want {
        assert!(
            pairs.iter().any(|(pk, pv)| pk == k && pv == v),
            "{k}={v:?} not in {pairs:?}"
        );
    }
    assert_eq!(
        pairs.iter().filter(|(k, _)| k == "grant_type").count(),
        1,
        "{pairs:?}"
    );
    assert_eq!(pairs.iter().filter(|(k, _)| k == "resource").count(), 2);
    // Reserved names stay refused whatever their case or spelling? At least exactly.
    for name in ["grant_type", "scope", "client_id", "client_secret", ""] {
        let svc = tower::service_fn(|_req: Req| async {
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        });
        let cc = ClientCredentials::new(svc, "https://auth.s112.test/t", "c112", SECRET).unwrap();
        let r = cc.with_param(name, "x");
        assert!(r.is_err(), "{name:?} accepted");
    }
}

// ---------------------------------------------------------------------------------------------
// A background refresh whose runtime is dropped.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_a_background_refresh_lost_with_its_runtime_is_started_again_by_the_next_caller() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let token_ep = tower::service_fn(move |_req: Req| {
        let k = n2.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if k == 2 {
                // The refresh started on the runtime that will be dropped: never answers.
                std::future::pending::<()>().await;
            }
            let body =
                format!(r#"{{"access_token":"B-{k}","token_type":"Bearer","expires_in":120}}"#);
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(body)))
        }
    });
    let cc = ClientCredentials::new(token_ep, "https://auth.s112.test/t", "c112", SECRET).unwrap();
    let t = get(&cc).await.unwrap();
    assert_eq!(t.secret().expose_secret(), "B-1");
    // Past the refresh point (120 - 60 s) on this runtime's clock.
    tokio::time::advance(Duration::from_secs(61)).await;
    let cc2 = cc.clone();
    let n3 = n.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::advance(Duration::from_secs(61)).await;
            let t = cc2.get().await.unwrap();
            assert_eq!(t.secret().expose_secret(), "B-1", "the still-valid token");
            for _ in 0..20 {
                if n3.load(Ordering::SeqCst) == 2 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(n3.load(Ordering::SeqCst), 2, "the refresh went out");
        });
        drop(rt);
    })
    .join()
    .unwrap();
    // Back here: the refresh died with its runtime; the next caller still gets B-1 at once and
    // starts another refresh, which lands.
    let t = within("get", ms(100), get(&cc)).await.unwrap();
    assert_eq!(t.secret().expose_secret(), "B-1");
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(n.load(Ordering::SeqCst), 3, "a new refresh");
    let t = within("get", ms(100), get(&cc)).await.unwrap();
    assert_eq!(t.secret().expose_secret(), "B-3");
}

// ---------------------------------------------------------------------------------------------
// Event hosts: IPv6, default ports, upper-case schemes.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_event_hosts_for_ipv6_and_default_ports() {
    for (url, want) in [
        ("http://[::FFFF:7F00:1]:8080/t", "[::ffff:7f00:1]:8080"),
        ("HTTPS://Auth.S112.TEST/t", "auth.s112.test"),
        ("https://Auth.S112.TEST:443/t", "auth.s112.test:443"),
    ] {
        let got = Arc::new(Mutex::new(Vec::<String>::new()));
        let g = got.clone();
        let svc = tower::service_fn(|_req: Req| async {
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(
                r#"{"access_token":"v","token_type":"Bearer","expires_in":60}"#,
            )))
        });
        let cc = ClientCredentials::new(svc, url, "c112", SECRET)
            .unwrap()
            .on_event(move |e| {
                if let Event::TokenFetched { endpoint, .. } = e {
                    g.lock().unwrap().push(endpoint.to_string());
                }
            });
        get(&cc).await.unwrap();
        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        // Lower case always; the port as written (metrics guide: "The port is as written").
        assert_eq!(got[0], want, "{url}");
    }
}

// ---------------------------------------------------------------------------------------------
// More on the resend: what counts, and the events.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn s112_a_double_close_is_one_failed_token_request_in_events() {
    let raw = raw_endpoint(|_| Act::Close).await;
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let ev = events.clone();
    let cc = raw_creds(&raw).on_event(move |e| {
        if let Event::TokenFailed {
            endpoint,
            error,
            retry_in,
            keeping_current,
        } = e
        {
            ev.lock().unwrap().push(format!(
                "{endpoint} {error:?} {retry_in:?} {keeping_current}"
            ));
        }
    });
    let _ = within("get", ms(3000), get(&cc)).await.unwrap_err();
    let host = raw
        .url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        *events.lock().unwrap(),
        vec![format!("{host} Transport 1s false")]
    );
    assert_eq!(raw.conns(), 2);
}

#[tokio::test]
async fn s112_observed_resends_for_a_cut_head_and_a_garbage_answer() {
    // Neither is "an answer of any status" (no status line read whole) nor a refused connection:
    // the docs allow one resend. Observe, and require at most one.
    for (name, bytes) in [
        ("cut head", b"HTTP/1.1 200 OK\r\ncontent-ty".to_vec()),
        ("garbage", b"NOT HTTP AT ALL\r\n\r\n".to_vec()),
    ] {
        let raw = raw_endpoint(move |_| Act::Send(bytes.clone())).await;
        let cc = raw_creds(&raw);
        let e = within(name, ms(3000), get(&cc)).await.unwrap_err();
        tokio::time::sleep(ms(50)).await;
        println!("{name}: {} connections: {}", raw.conns(), err_of(&e));
        assert!(raw.conns() <= 2, "{name}: {}", raw.conns());
    }
}

// ---------------------------------------------------------------------------------------------
// A token client that never gets ready, or fails to.
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct NeverReady {
    fail: bool,
    calls: Arc<AtomicUsize>,
}
impl Service<Req> for NeverReady {
    type Response = Res;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Res, BoxError>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.fail {
            Poll::Ready(Err(std::io::Error::other("client worker gone").into()))
        } else {
            Poll::Pending
        }
    }
    fn call(&mut self, _req: Req) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(Response::new(Full::default())) })
    }
}

#[tokio::test(start_paused = true)]
async fn s112_a_token_client_never_ready_is_bounded_by_the_request_timeout() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cc = ClientCredentials::new(
        NeverReady {
            fail: false,
            calls: calls.clone(),
        },
        "https://auth.s112.test/t",
        "c112",
        SECRET,
    )
    .unwrap()
    .with_request_timeout(Duration::from_secs(2));
    let t0 = tokio::time::Instant::now();
    let e = within("get", Duration::from_secs(20), get(&cc))
        .await
        .unwrap_err();
    assert_eq!(err_of(&e).kind(), &ErrorKind::Timeout, "{e}");
    assert!(t0.elapsed() <= Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(err_of(&e).to_string().contains("https://auth.s112.test/t"));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn s112_a_token_client_whose_readiness_fails_is_an_error_naming_the_endpoint() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cc = ClientCredentials::new(
        NeverReady {
            fail: true,
            calls: calls.clone(),
        },
        "https://auth.s112.test/t",
        "c112",
        SECRET,
    )
    .unwrap();
    let e = within("get", Duration::from_secs(5), get(&cc))
        .await
        .unwrap_err();
    let text = all_text(&*e);
    assert!(text.contains("https://auth.s112.test/t"), "{text}");
    assert!(text.contains("client worker gone"), "the cause: {text}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------
// A zero token timeout with a cached token that is due, or whose refresh failed.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_a_zero_token_timeout_uses_a_due_token_while_it_refreshes_or_backs_off() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let token_ep = tower::service_fn(move |_req: Req| {
        let k = n2.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            match k {
                1 => {}
                2 => tokio::time::sleep(Duration::from_secs(10)).await,
                _ => {
                    return Ok::<_, BoxError>(
                        Response::builder()
                            .status(503)
                            .body(Full::<Bytes>::default())
                            .unwrap(),
                    )
                }
            }
            let body =
                format!(r#"{{"access_token":"Z-{k}","token_type":"Bearer","expires_in":120}}"#);
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(body)))
        }
    });
    let cc = ClientCredentials::new(token_ep, "https://auth.s112.test/t", "c112", SECRET).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let api = tower::service_fn(move |req: Req| {
        s.lock()
            .unwrap()
            .push(req.headers()["authorization"].to_str().unwrap().to_string());
        async { Ok::<_, BoxError>(Response::new(Full::<Bytes>::default())) }
    });
    let mut svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(cc.clone()).with_token_timeout(Duration::ZERO))
        .service(api);
    let req = || {
        Request::get("https://api.s112.test/z")
            .body(Full::default())
            .unwrap()
    };
    // No token yet: fails at once (the request goes on).
    let e = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    assert_eq!(err_of(&e).kind(), &ErrorKind::Timeout, "{e}");
    tokio::task::yield_now().await;
    tokio::time::advance(ms(1)).await;
    svc.ready().await.unwrap().call(req()).await.unwrap();
    // Due for refresh (61 of 120 s): the refresh takes 10 s; calls go on with Z-1 at once.
    tokio::time::advance(Duration::from_secs(61)).await;
    for _ in 0..3 {
        svc.ready().await.unwrap().call(req()).await.unwrap();
    }
    settle().await;
    tokio::time::advance(Duration::from_secs(11)).await;
    settle().await;
    svc.ready().await.unwrap().call(req()).await.unwrap();
    // Z-2 is good to 72 + 120 s; advance to its refresh point and make the refresh fail (503):
    // the still-valid token keeps working with a zero timeout during the backoff.
    tokio::time::advance(Duration::from_secs(70)).await;
    settle().await;
    for i in 0..3 {
        let r = svc.ready().await.unwrap().call(req()).await;
        assert!(r.is_ok(), "call {i} in the backoff: {r:?}");
        r.unwrap();
        tokio::time::advance(ms(300)).await;
        settle().await;
    }
    let s = seen.lock().unwrap().clone();
    assert_eq!(s, [vec!["Bearer Z-1"; 4], vec!["Bearer Z-2"; 4],].concat());
}

// ---------------------------------------------------------------------------------------------
// A body over the replay limit is sent once, with its trailers.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn s112_a_known_size_body_over_the_replay_limit_keeps_its_trailers() {
    let src = Arc::new(Counting::default());
    let seen = Arc::new(Mutex::new(Vec::<(bool, Option<String>)>::new()));
    let s2 = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::token_source(src).with_replay_limit(2))
        .service(tower::service_fn(move |req: Request<_>| {
            let s2 = s2.clone();
            async move { trailers_api(req, s2).await }
        }));
    let res = svc.oneshot(trailed(true)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(true, Some("c112".to_string()))],
        "a body that is not kept goes out as it is, trailers and all"
    );
}

// ---------------------------------------------------------------------------------------------
// Redaction of a secret with quotes, backslashes, a control and non-ASCII, as JSON and as Basic.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_a_secret_with_json_specials_echoed_as_json_and_as_basic_is_redacted() {
    let secret = "q\"uo\\te\u{1}Ω-s112-Kk";
    let json_spelling = serde_json::to_string(secret).unwrap();
    let json_inner = json_spelling.trim_matches('"').to_string();
    let url = "https://auth.s112.test/oauth/token";
    // The server echoes: the secret in `error_description`, inside an object as `error`, and the
    // Authorization header it got.
    for shape in 0..3 {
        let svc = tower::service_fn(move |req: Req| {
            let basic = req
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let body = match shape {
                0 => serde_json::json!({"error": "invalid_client", "error_description": format!("secret {secret} wrong")}),
                1 => serde_json::json!({"error": {"echo": secret, "n": 1}}),
                _ => serde_json::json!({"error": "invalid_client", "error_description": format!("header {basic}")}),
            }
            .to_string();
            async move {
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(401)
                        .header("content-type", "application/json")
                        .body(Full::<Bytes>::from(body))
                        .unwrap(),
                )
            }
        });
        let cc = ClientCredentials::new(svc, url, "c112-ü", secret).unwrap();
        let e = get(&cc).await.unwrap_err();
        let text = format!("{} || {e:?}", all_text(&*e));
        let display = all_text(&*e);
        println!("shape {shape}: {display}");
        assert!(
            !display.contains(secret),
            "shape {shape}: raw secret in {display:?}"
        );
        assert!(
            !display.contains(&json_inner),
            "shape {shape}: JSON-escaped secret in {display}"
        );
        assert!(!display.contains("Ω-s112-Kk"), "shape {shape}: {display}");
        assert!(!text.contains("Ω-s112-Kk"), "shape {shape}: Debug: {text}");
        assert!(!display.chars().any(|c| c.is_control()), "{display:?}");
        if shape == 2 {
            assert!(
                display.contains("header Basic [redacted]"),
                "base64 credentials: {display}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ClientBuilder: a token wait and the request each get up to an attempt timeout.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_in_the_stack_a_request_after_a_slow_token_gets_a_full_attempt_timeout() {
    let token_ep = tower::service_fn(|_req: Req| async {
        tokio::time::sleep(ms(800)).await;
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(
            r#"{"access_token":"A-1","token_type":"Bearer","expires_in":3600}"#,
        )))
    });
    let cc = ClientCredentials::new(token_ep, "https://auth.s112.test/t", "c112", SECRET).unwrap();
    let api_calls = Arc::new(AtomicUsize::new(0));
    let a = api_calls.clone();
    let api = tower::service_fn(move |req: Req| {
        a.fetch_add(1, Ordering::SeqCst);
        async move {
            assert_eq!(req.headers()["authorization"], "Bearer A-1");
            tokio::time::sleep(ms(800)).await;
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        }
    });
    let client = sturdy::ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(cc))
        .with_attempt_timeout(Duration::from_secs(1))
        .build(api);
    let t0 = tokio::time::Instant::now();
    let res = within(
        "call",
        Duration::from_secs(10),
        client.oneshot(
            Request::post("https://api.s112.test/o")
                .body(Full::from("x"))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(api_calls.load(Ordering::SeqCst), 1, "one attempt");
    let took = t0.elapsed();
    assert!(
        took >= ms(1600) && took < ms(1700),
        "token 800 ms + request 800 ms: {took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The hold for refused tokens: after an accepted token, and timed from the response.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_the_refusal_hold_starts_over_after_an_accepted_token_and_counts_from_the_response() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    // Each token response takes 500 ms.
    let token_ep = tower::service_fn(move |_req: Req| {
        let k = n2.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(ms(500)).await;
            let body =
                format!(r#"{{"access_token":"H-{k}","token_type":"Bearer","expires_in":3600}}"#);
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(body)))
        }
    });
    let cc = ClientCredentials::new(token_ep, "https://auth.s112.test/t", "c112", SECRET).unwrap();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = log.clone();
    // H-1 is accepted on its first call only; every other request is refused.
    let api = tower::service_fn(move |req: Req| {
        let tok = req.headers()["authorization"].to_str().unwrap().to_string();
        let mut l = l.lock().unwrap();
        let first = l.is_empty();
        l.push(tok);
        let status = if first { 200 } else { 401 };
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let mut svc: tower::util::BoxService<Req, Res, BoxError> = tower::util::BoxService::new(
        ServiceBuilder::new()
            .layer(AuthLayer::oauth2(cc))
            .service(api),
    );
    let t0 = tokio::time::Instant::now();
    assert_eq!(call(&mut svc).await, 200); // H-1 accepted (t = 0.5 s)
                                           // H-1 refused after it worked: replaced at once (H-2), the replay refused too.
    assert_eq!(call(&mut svc).await, 401);
    assert_eq!(n.load(Ordering::SeqCst), 2);
    // H-2 was refused before it was accepted, but H-1 before it had worked: no hold.
    assert_eq!(call(&mut svc).await, 401);
    assert_eq!(n.load(Ordering::SeqCst), 3, "H-2 is replaced at once");
    // H-3 refused before accepted, after H-2 went the same way: held 1 s from its response.
    let h3_came = t0.elapsed();
    for _ in 0..3 {
        assert_eq!(call(&mut svc).await, 401);
    }
    assert_eq!(n.load(Ordering::SeqCst), 3, "H-3 held");
    // 800 ms after H-3's response (1.3 s after it was asked for): still held.
    tokio::time::advance(ms(800)).await;
    assert_eq!(call(&mut svc).await, 401);
    assert_eq!(
        n.load(Ordering::SeqCst),
        3,
        "held 1 s from the response, not the request (H-3 came at {h3_came:?})"
    );
    tokio::time::advance(ms(300)).await;
    assert_eq!(call(&mut svc).await, 401);
    assert_eq!(n.load(Ordering::SeqCst), 4, "the hold ended: H-4");
    let l = log.lock().unwrap().clone();
    println!("{l:?}");
    assert_eq!(
        l,
        [
            "Bearer H-1",
            "Bearer H-1",
            "Bearer H-2",
            "Bearer H-2",
            "Bearer H-3",
            "Bearer H-3",
            "Bearer H-3",
            "Bearer H-3",
            "Bearer H-3",
            "Bearer H-3",
            "Bearer H-4"
        ]
    );
}

async fn call(svc: &mut tower::util::BoxService<Req, Res, BoxError>) -> u16 {
    let req = Request::get("https://api.s112.test/h")
        .body(Full::default())
        .unwrap();
    svc.ready()
        .await
        .unwrap()
        .call(req)
        .await
        .unwrap()
        .status()
        .as_u16()
}

// ---------------------------------------------------------------------------------------------
// Metric labels: lower-case hosts, ports as written.
// ---------------------------------------------------------------------------------------------

fn metric_rows(
    snap: &metrics_util::debugging::Snapshotter,
) -> Vec<(String, std::collections::BTreeMap<String, String>, u64)> {
    snap.snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(ck, _, _, value)| {
            let (_, key) = ck.into_parts();
            match value {
                metrics_util::debugging::DebugValue::Counter(n) if n > 0 => Some((
                    key.name().to_owned(),
                    key.labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect(),
                    n,
                )),
                _ => None,
            }
        })
        .filter(|(name, _, _)| name.starts_with("sturdy.auth."))
        .collect()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s112_token_metrics_label_lower_case_hosts_with_ports_as_written() {
    let rec = metrics_util::debugging::DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let token_ep = tower::service_fn(move |_req: Req| {
        let k = n2.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let (status, body) = if k == 1 {
                (503, String::new())
            } else {
                (
                    200,
                    format!(r#"{{"access_token":"M-{k}","token_type":"Bearer","expires_in":600}}"#),
                )
            };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::from(body))
                    .unwrap(),
            )
        }
    });
    let cc =
        ClientCredentials::new(token_ep, "https://AUTH-M.S112.Example/t", "c112", SECRET).unwrap();
    let first = Arc::new(AtomicUsize::new(0));
    let f = first.clone();
    let api = tower::service_fn(move |_req: Req| {
        let k = f.fetch_add(1, Ordering::SeqCst);
        async move {
            let status = if k == 0 { 401 } else { 200 };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(cc))
        .service(api);
    let _ = svc
        .clone()
        .oneshot(
            Request::get("https://API-M.S112.Example:443/x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    tokio::time::advance(Duration::from_secs(2)).await;
    let res = svc
        .oneshot(
            Request::get("https://API-M.S112.Example:443/x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rows = metric_rows(&snap);
    let show = |name: &str| -> Vec<String> {
        rows.iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, c)| {
                format!(
                    "{} {}",
                    l.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                    c
                )
            })
            .collect()
    };
    assert_eq!(
        show("sturdy.auth.token.failures"),
        vec!["error.type=503,server.address=auth-m.s112.example 1".to_string()]
    );
    assert_eq!(
        show("sturdy.auth.token.fetches"),
        vec!["server.address=auth-m.s112.example 2".to_string()]
    );
    assert_eq!(
        show("sturdy.auth.token.rejections"),
        vec!["server.address=api-m.s112.example,server.port=443 1".to_string()]
    );
}

#[tokio::test]
async fn s112_a_connection_reset_while_the_request_body_is_written_is_resent_once() {
    // A 4 MB form (an extra parameter) cannot be written before the reset comes.
    let raw = raw_endpoint(|n| {
        if n == 1 {
            Act::ResetAtHead
        } else {
            ok_answer("tok-w")
        }
    })
    .await;
    let cc = ClientCredentials::new(hyper_client(), &raw.url, "c112", SECRET)
        .unwrap()
        .with_request_timeout(ms(3000))
        .with_param("resource", "r".repeat(4 << 20))
        .unwrap();
    let r = within("get", ms(5000), get(&cc)).await;
    let t = r.unwrap_or_else(|e| panic!("{}: {}", raw.conns(), all_text(&*e)));
    assert_eq!(t.secret().expose_secret(), "tok-w");
    assert_eq!(raw.conns(), 2);
}

/// A token client that fails each call with the error `make` builds, counting calls.
fn failing_client(
    make: fn() -> BoxError,
) -> (
    impl Service<Req, Response = Res, Error = BoxError, Future: Send + 'static> + Clone + Send + 'static,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = tower::service_fn(move |_req: Req| {
        c.fetch_add(1, Ordering::SeqCst);
        async move { Err::<Res, BoxError>(make()) }
    });
    (svc, calls)
}

#[tokio::test(start_paused = true)]
async fn s112_a_refused_connection_or_a_timeout_from_the_client_is_not_resent() {
    use std::io::{Error as IoError, ErrorKind as IoKind};
    let cases: Vec<(&str, fn() -> BoxError, usize)> = vec![
        (
            "refused",
            || IoError::new(IoKind::ConnectionRefused, "connection refused").into(),
            1,
        ),
        (
            "sturdy timeout",
            || sturdy::core::Error::new(ErrorKind::Timeout, "client timeout").into(),
            1,
        ),
        (
            "sturdy connect",
            || sturdy::core::Error::new(ErrorKind::Connect, "no route").into(),
            1,
        ),
        (
            "sturdy transport",
            || sturdy::core::Error::new(ErrorKind::Transport, "connection reset by peer").into(),
            2,
        ),
    ];
    let mut wrong = Vec::new();
    for (name, make, want) in cases {
        let (svc, calls) = failing_client(make);
        let cc = ClientCredentials::new(svc, "https://auth.s112.test/t", "c112", SECRET).unwrap();
        let e = get(&cc).await.unwrap_err();
        let got = calls.load(Ordering::SeqCst);
        if got != want {
            wrong.push(format!(
                "{name}: {got} calls, want {want}: {}",
                all_text(&*e)
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Reads one request (head and content-length body) from `conn` into `got`; false on EOF.
async fn read_request(conn: &mut tokio::net::TcpStream, got: &mut Vec<u8>) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse::<usize>().unwrap())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                got.drain(..end + 4 + len);
                return true;
            }
        }
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => got.extend_from_slice(&buf[..k]),
        }
    }
}

#[tokio::test]
async fn s112_a_pooled_token_connection_closed_by_the_server_is_resent_on_a_new_one() {
    // Connection 1 answers its first request with keep-alive, then closes on the second
    // without a byte: what a server that timed the idle connection out does, found out by the
    // client only once the request was written. Connection 2 answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(AtomicUsize::new(0));
    let (rq, cn) = (requests.clone(), conns.clone());
    let server = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let c = cn.fetch_add(1, Ordering::SeqCst) + 1;
            let rq = rq.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut on_conn = 0;
                while read_request(&mut conn, &mut got).await {
                    let n = rq.fetch_add(1, Ordering::SeqCst) + 1;
                    on_conn += 1;
                    if c == 1 && on_conn == 2 {
                        return; // closed under the second request
                    }
                    let body = format!(
                        r#"{{"access_token":"P-{n}","token_type":"Bearer","expires_in":3600}}"#
                    );
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let cc = ClientCredentials::new(
        hyper_client(),
        &format!("http://{addr}/token"),
        "c112",
        SECRET,
    )
    .unwrap()
    .with_request_timeout(ms(2000));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let api = tower::service_fn(move |req: Req| {
        let tok = req.headers()["authorization"].to_str().unwrap().to_string();
        s.lock().unwrap().push(tok.clone());
        let status = if tok == "Bearer P-1" { 401 } else { 200 };
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(cc))
        .service(api);
    let res = within(
        "call",
        ms(4000),
        svc.oneshot(
            Request::get("http://api.s112.test/")
                .body(Full::default())
                .unwrap(),
        ),
    )
    .await;
    let res = res.unwrap_or_else(|e| {
        panic!(
            "{} requests on {} connections: {}",
            requests.load(Ordering::SeqCst),
            conns.load(Ordering::SeqCst),
            all_text(&*e)
        )
    });
    assert_eq!(res.status(), 200);
    assert_eq!(*seen.lock().unwrap(), vec!["Bearer P-1", "Bearer P-3"]);
    assert_eq!(requests.load(Ordering::SeqCst), 3);
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    server.abort();
}

// ---------------------------------------------------------------------------------------------
// Cancellation: a task aborted at every 3 ms of a 401 path, another caller alongside.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_aborting_one_caller_at_every_point_never_strands_the_other_under_buffer_and_limit() {
    for cut in (0..420u64).step_by(3) {
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let token_ep = tower::service_fn(move |_req: Req| {
            let k = n2.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(ms(100)).await;
                let body = format!(
                    r#"{{"access_token":"C-{k}","token_type":"Bearer","expires_in":3600}}"#
                );
                Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(body)))
            }
        });
        let cc =
            ClientCredentials::new(token_ep, "https://auth.s112.test/t", "c112", SECRET).unwrap();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_seen = Arc::new(AtomicUsize::new(0));
        let (f, m) = (in_flight.clone(), max_seen.clone());
        let api = tower::service_fn(move |req: Req| {
            let (f, m) = (f.clone(), m.clone());
            async move {
                let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                // Counted out when the call ends or is dropped.
                let _out = Out(f);
                let refused = req.headers()["authorization"] == "Bearer C-1";
                tokio::time::sleep(ms(50)).await;
                let status = if refused { 401 } else { 200 };
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(status)
                        .body(Full::<Bytes>::default())
                        .unwrap(),
                )
            }
        });
        let svc = ServiceBuilder::new()
            .buffer(4)
            .layer(AuthLayer::oauth2(cc).with_token_timeout(Duration::from_secs(5)))
            .concurrency_limit(1)
            .service(api);
        let call = |mut s: tower::buffer::Buffer<Req, _>| async move {
            let req = Request::post("https://api.s112.test/c")
                .body(Full::from("body"))
                .unwrap();
            s.ready().await?.call(req).await
        };
        let a = tokio::spawn(call(svc.clone()));
        let b_svc = svc.clone();
        let b = tokio::spawn(async move {
            tokio::time::sleep(ms(20)).await;
            call(b_svc).await
        });
        tokio::time::sleep(ms(cut)).await;
        a.abort();
        let rb = tokio::time::timeout(Duration::from_secs(10), b)
            .await
            .unwrap_or_else(|_| panic!("cut {cut}: B stranded"))
            .unwrap()
            .unwrap_or_else(|e| panic!("cut {cut}: B failed: {e}"));
        assert_eq!(rb.status(), 200, "cut {cut}");
        let rc = tokio::time::timeout(Duration::from_secs(1), call(svc.clone()))
            .await
            .unwrap_or_else(|_| panic!("cut {cut}: C stranded"))
            .unwrap();
        assert_eq!(rc.status(), 200, "cut {cut}");
        assert!(
            n.load(Ordering::SeqCst) <= 2,
            "cut {cut}: {} tokens",
            n.load(Ordering::SeqCst)
        );
        assert_eq!(max_seen.load(Ordering::SeqCst), 1, "cut {cut}");
    }
}

/// Takes one from the counter when dropped.
struct Out(Arc<AtomicUsize>);
impl Drop for Out {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Non-ASCII and C1-control access tokens: sent byte-exact, or refused and never cached.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_a_non_ascii_access_token_is_sent_exactly_or_refused_and_not_cached() {
    for odd in ["tök-1", "a\u{85}b-1", "a\u{2028}b-1", "😀-1"] {
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let token_ep = tower::service_fn(move |_req: Req| {
            let k = n2.fetch_add(1, Ordering::SeqCst) + 1;
            let tok = if k == 1 {
                odd.to_string()
            } else {
                format!("plain-{k}")
            };
            let body =
                serde_json::json!({"access_token": tok, "token_type": "Bearer", "expires_in": 600})
                    .to_string();
            async move { Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(body))) }
        });
        let cc =
            ClientCredentials::new(token_ep, "https://auth.s112.test/t", "c112", SECRET).unwrap();
        let seen = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let s = seen.clone();
        let api = tower::service_fn(move |req: Req| {
            s.lock()
                .unwrap()
                .push(req.headers()["authorization"].as_bytes().to_vec());
            async { Ok::<_, BoxError>(Response::new(Full::<Bytes>::default())) }
        });
        let mut svc = ServiceBuilder::new()
            .layer(AuthLayer::oauth2(cc))
            .service(api);
        let req = || {
            Request::get("https://api.s112.test/n")
                .body(Full::default())
                .unwrap()
        };
        let r1 = svc.ready().await.unwrap().call(req()).await;
        tokio::time::advance(Duration::from_secs(2)).await;
        let r2 = svc.ready().await.unwrap().call(req()).await;
        let seen = seen.lock().unwrap().clone();
        match r1 {
            Ok(_) => {
                assert_eq!(seen[0], format!("Bearer {odd}").into_bytes(), "{odd:?}");
                assert!(r2.is_ok());
                assert_eq!(n.load(Ordering::SeqCst), 1, "{odd:?}: kept");
            }
            Err(e) => {
                let err = err_of(&e);
                assert_eq!(err.kind(), &ErrorKind::Auth, "{odd:?}: {err}");
                assert!(
                    !err.to_string().contains(odd),
                    "{odd:?}: quotes the token: {err}"
                );
                // Not cached: the next call asks for a new token and goes through.
                let r2 = r2.unwrap_or_else(|e| panic!("{odd:?}: second call: {e}"));
                assert_eq!(r2.status(), 200);
                assert_eq!(seen, vec![b"Bearer plain-2".to_vec()], "{odd:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The backoff starts over after a success; N callers share a resent request.
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s112_the_backoff_starts_over_at_one_second_after_a_token_was_fetched() {
    // 503, 503, 503, 200 (10 s token), then 503s.
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let token_ep = tower::service_fn(move |_req: Req| {
        let k = n2.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let (status, body) = if k == 4 {
                (
                    200,
                    r#"{"access_token":"R-4","token_type":"Bearer","expires_in":10}"#.to_string(),
                )
            } else {
                (503, String::new())
            };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::from(body))
                    .unwrap(),
            )
        }
    });
    let failures = Arc::new(Mutex::new(Vec::<(Duration, bool)>::new()));
    let f = failures.clone();
    let cc = ClientCredentials::new(token_ep, "https://auth.s112.test/t", "c112", SECRET)
        .unwrap()
        .on_event(move |e| {
            if let Event::TokenFailed {
                retry_in,
                keeping_current,
                ..
            } = e
            {
                f.lock().unwrap().push((*retry_in, *keeping_current));
            }
        });
    for wait in [1u64, 2, 4] {
        assert!(get(&cc).await.is_err());
        tokio::time::advance(Duration::from_secs(wait)).await;
        settle().await;
    }
    let t = get(&cc).await.unwrap();
    assert_eq!(t.secret().expose_secret(), "R-4");
    // Due at 10 - 5 s: the background refresh fails; the token stays.
    tokio::time::advance(Duration::from_secs(6)).await;
    let t = get(&cc).await.unwrap();
    assert_eq!(t.secret().expose_secret(), "R-4");
    settle().await;
    assert_eq!(n.load(Ordering::SeqCst), 5);
    let secs = Duration::from_secs;
    assert_eq!(
        *failures.lock().unwrap(),
        vec![
            (secs(1), false),
            (secs(2), false),
            (secs(4), false),
            (secs(1), true)
        ],
        "after a success the backoff starts again at 1 s"
    );
}

#[tokio::test]
async fn s112_twenty_callers_share_one_resent_token_request() {
    let raw = raw_endpoint(|n| {
        if n == 1 {
            Act::CloseAfter(ms(50))
        } else {
            ok_answer("tok-n")
        }
    })
    .await;
    let cc = raw_creds(&raw);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let cc = cc.clone();
        tasks.push(tokio::spawn(async move { get(&cc).await }));
    }
    for t in tasks {
        let tok = within("caller", ms(3000), t).await.unwrap().unwrap();
        assert_eq!(tok.secret().expose_secret(), "tok-n");
    }
    assert_eq!(raw.conns(), 2);
}

// ---------------------------------------------------------------------------------------------
// `audience` from both setters.
// ---------------------------------------------------------------------------------------------

async fn sent_form(
    make: impl FnOnce(ClientCredentials) -> ClientCredentials,
) -> Vec<(String, String)> {
    let bodies = Arc::new(Mutex::new(Vec::<String>::new()));
    let b = bodies.clone();
    let svc = tower::service_fn(move |req: Req| {
        let b = b.clone();
        async move {
            let body = req.into_body().collect().await?.to_bytes();
            b.lock()
                .unwrap()
                .push(String::from_utf8(body.to_vec()).unwrap());
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(
                r#"{"access_token":"p","token_type":"Bearer","expires_in":60}"#,
            )))
        }
    });
    let cc = make(ClientCredentials::new(svc, "https://auth.s112.test/t", "c112", SECRET).unwrap());
    get(&cc).await.unwrap();
    let sent = bodies.lock().unwrap()[0].clone();
    form_decode(&sent)
}

#[tokio::test(start_paused = true)]
async fn s112_with_audience_after_with_param_audience_sends_one_audience() {
    let pairs = sent_form(|cc| {
        cc.with_param("audience", "first")
            .unwrap()
            .with_audience("second")
            .with_audience("third")
    })
    .await;
    let auds: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "audience")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(auds, vec!["third"], "{pairs:?}");
}

#[tokio::test(start_paused = true)]
#[ignore = "DOCUMENTED since: with_audience's rustdoc says a with_param(\"audience\", ..) called after it adds a second one, as with_param always adds"]
async fn s112_with_param_audience_after_with_audience_sends_one_audience() {
    let pairs = sent_form(|cc| {
        cc.with_audience("first")
            .with_param("audience", "second")
            .unwrap()
    })
    .await;
    let auds: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "audience")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(auds.len(), 1, "{pairs:?}");
}

// ---------------------------------------------------------------------------------------------
// The token URL's query and password through the whole error chain, hyper-util and reqwest.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn s112_the_token_urls_query_is_in_no_error_of_the_chain_for_either_client() {
    let q = "TenantKeyS112Zz9";
    let mut bad = Vec::new();
    for (name, act) in [
        ("closed", Act::Close),
        (
            "cut",
            Act::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 90\r\n\r\n{\"acc".to_vec()),
        ),
        ("garbage", Act::Send(b"NOT HTTP\r\n\r\n".to_vec())),
        ("stall", Act::Stall),
    ] {
        let raw = raw_endpoint(move |_| act.clone()).await;
        let url = format!("{}?tenant={q}", raw.url).replace("http://", "http://u112:PwS112Secret@");
        let hy = ClientCredentials::new(hyper_client(), &url, "c112", SECRET)
            .unwrap()
            .with_request_timeout(ms(300));
        let rq = ClientCredentials::new(
            sturdy::reqwest::ReqwestService::new(reqwest::Client::new()),
            &url,
            "c112",
            SECRET,
        )
        .unwrap()
        .with_request_timeout(ms(300));
        for (client, cc) in [("hyper", hy), ("reqwest", rq)] {
            let e = within(name, ms(3000), get(&cc)).await.unwrap_err();
            let text = format!("{} || {e:?}", all_text(&*e));
            if text.contains(q) || text.contains("PwS112Secret") {
                bad.push(format!("{client} {name}: {text}"));
            }
        }
    }
    // A refused connection, through reqwest.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/t?tenant={q}");
    let rq = ClientCredentials::new(
        sturdy::reqwest::ReqwestService::new(reqwest::Client::new()),
        &url,
        "c112",
        SECRET,
    )
    .unwrap();
    let e = within("refused", ms(3000), get(&rq)).await.unwrap_err();
    let text = format!("{} || {e:?}", all_text(&*e));
    if text.contains(q) {
        bad.push(format!("reqwest refused: {text}"));
    }
    assert!(bad.is_empty(), "{bad:#?}");
}
