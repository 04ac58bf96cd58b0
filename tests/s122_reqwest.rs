#![cfg(feature = "full")]
//! s122 (outside round): `sturdy::reqwest` checked against docs/guides/reqwest.md, in the
//! corners earlier rounds left: which timeout wins (reqwest's own on the client or the request,
//! sturdy's attempt timeout, a `CallOptions` attempt timeout or deadline) and whether the error
//! says which; a POST redirected by a 307 whose target fails, retried at the original URL with
//! one key; streamed bodies and 307s through the middleware; body limits on bytes bodies; body
//! read errors after the middleware; builder errors that never reach the stack; a breaker fed
//! sturdy's attempt timeouts; a `send()` dropped at many points leaving nothing held; large
//! responses; `Clone + Send + Sync` clients and `Send` futures. Real sockets on 127.0.0.1 in
//! real time with millisecond settings.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::TokioIo;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::{CallOptions, CircuitOpen, Delivery, ErrorKind};
use sturdy::reqwest::{delivery, find, ReqwestService, SturdyMiddleware};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tower::ServiceExt;

#[derive(Clone, Debug)]
struct Rec {
    method: String,
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
}

type Handler = Arc<dyn Fn(usize, Rec) -> BoxFuture<'static, Response<Full<Bytes>>> + Send + Sync>;

struct Srv {
    addr: SocketAddr,
    recs: Arc<Mutex<Vec<Rec>>>,
    conns: Arc<AtomicUsize>,
}

impl Srv {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    fn recs(&self) -> Vec<Rec> {
        self.recs.lock().unwrap().clone()
    }
    fn count(&self) -> usize {
        self.recs.lock().unwrap().len()
    }
    fn paths(&self) -> Vec<String> {
        self.recs().iter().map(|r| r.path.clone()).collect()
    }
    fn keys(&self) -> Vec<String> {
        self.recs()
            .iter()
            .map(|r| {
                r.headers
                    .get("idempotency-key")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default()
            })
            .collect()
    }
}

async fn serve(h: Handler) -> Srv {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let recs: Arc<Mutex<Vec<Rec>>> = Arc::default();
    let conns = Arc::new(AtomicUsize::new(0));
    let (r2, c2) = (recs.clone(), conns.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c2.fetch_add(1, Ordering::SeqCst);
            let h = h.clone();
            let recs = r2.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let h = h.clone();
                    let recs = recs.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let rec = Rec {
                            method: parts.method.to_string(),
                            path: parts.uri.path().to_owned(),
                            headers: parts.headers,
                            body,
                        };
                        let n = {
                            let mut g = recs.lock().unwrap();
                            g.push(rec.clone());
                            g.len() - 1
                        };
                        Ok::<_, Infallible>(h(n, rec).await)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    Srv { addr, recs, conns }
}

fn status(code: u16) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

fn never() -> Handler {
    Arc::new(|_, _| {
        Box::pin(async {
            std::future::pending::<()>().await;
            status(200)
        })
    })
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10))
                .unwrap(),
        )
        .with_seed(122)
}

fn mw_client(
    make: impl FnOnce(sturdy::reqwest::NextAttempt) -> sturdy::Client<reqwest::Body>
        + Send
        + Sync
        + 'static,
) -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(make))
        .build()
}

async fn within<F: std::future::Future>(ms: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_millis(ms), f)
        .await
        .expect("test step took too long")
}

fn sturdy_err(err: &reqwest_middleware::Error) -> &sturdy::core::Error {
    find::<sturdy::core::Error>(err).expect("a sturdy error in the chain")
}

// ---------------------------------------------------------------- timeouts: which wins

/// reqwest.md, Configuring: "reqwest's `timeout` ... bounds each attempt, as does
/// `ClientBuilder`'s attempt timeout \[30 s\]; whichever is shorter fires first." Here sturdy's is
/// shorter: the error must not blame reqwest's timeout.
#[tokio::test]
async fn s122_sturdys_attempt_timeout_shorter_than_reqwests_fires_and_is_not_called_reqwests() {
    let s = serve(never()).await;
    let client = mw_client(|next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_attempt_timeout(Duration::from_millis(40))
            .build(next)
    });
    let t = Instant::now();
    let err = within(
        3000,
        client
            .get(s.url("/slow"))
            .timeout(Duration::from_secs(5))
            .send(),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        text,
        "gave up after 4 attempts: the attempt timed out after 40ms"
    );
    assert!(
        !text.contains("reqwest"),
        "sturdy's timer fired, not reqwest's: {text}"
    );
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert_eq!(e.report().unwrap().attempts(), 4);
    assert_eq!(s.count(), 4);
}

/// Same sentence, the other way round: reqwest's request timeout is shorter.
#[tokio::test]
async fn s122_reqwests_request_timeout_shorter_than_sturdys_fires_and_is_named() {
    let s = serve(never()).await;
    let client = mw_client(|next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_attempt_timeout(Duration::from_secs(5))
            .build(next)
    });
    let t = Instant::now();
    let err = within(
        3000,
        client
            .get(s.url("/slow"))
            .timeout(Duration::from_millis(40))
            .send(),
    )
    .await
    .unwrap_err();
    assert!(t.elapsed() < Duration::from_millis(1500));
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: timed out (reqwest's timeout)"
    );
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout);
    assert_eq!(s.count(), 4);
}

/// A reqwest timeout set on the `reqwest::Client` (not the request) under `ReqwestService`:
/// "reqwest's `timeout` (on the client or on one request) bounds each attempt".
#[tokio::test]
async fn s122_reqwest_service_client_level_timeout_bounds_each_attempt_and_is_named() {
    let s = serve(never()).await;
    let http = ReqwestService::new(
        reqwest::Client::builder()
            .timeout(Duration::from_millis(40))
            .build()
            .unwrap(),
    );
    let client = ClientBuilder::new().with_retry(quick_retry()).build(http);
    let req = http::Request::get(s.url("/slow"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let err = within(3000, client.oneshot(req)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: timed out (reqwest's timeout)"
    );
    assert_eq!(s.count(), 4);
}

/// A `CallOptions` attempt timeout given as an extension wins over the builder's for this
/// request (options.rs: "A value set here wins over the layer's configuration for this request
/// only"), and the next request without it keeps the builder's.
#[tokio::test]
async fn s122_call_options_attempt_timeout_through_the_middleware_wins_for_that_call_only() {
    let s = serve(never()).await;
    let client = mw_client(|next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_attempt_timeout(Duration::from_secs(20))
            .build(next)
    });
    let t = Instant::now();
    let err = within(
        3000,
        client
            .get(s.url("/slow"))
            .with_extension(
                CallOptions::new()
                    .with_attempt_timeout(Duration::from_millis(30))
                    .with_max_attempts(2),
            )
            .send(),
    )
    .await
    .unwrap_err();
    assert!(t.elapsed() < Duration::from_millis(1500));
    assert!(
        err.to_string().starts_with("gave up after 2 attempts: "),
        "{err}"
    );
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout);
    assert_eq!(s.count(), 2);
    // The next call has no options: the builder's 20 s timeout, so it is still waiting at 300 ms.
    let next = tokio::time::timeout(
        Duration::from_millis(300),
        client.get(s.url("/slow")).send(),
    )
    .await;
    assert!(next.is_err(), "the builder's 20 s timeout applies again");
}

/// `CallOptions::with_deadline`: "An overall deadline for this request: attempts and waits
/// together". Shorter than both the reqwest timeout and the attempt timeout, it ends the call;
/// the error is a timeout that does not blame reqwest's timer, and the call may have been
/// processed (an attempt was in flight).
#[tokio::test]
async fn s122_call_options_deadline_shorter_than_every_timeout_ends_the_call() {
    let s = serve(never()).await;
    let client = mw_client(|next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_attempt_timeout(Duration::from_secs(5))
            .build(next)
    });
    let t = Instant::now();
    let err = within(
        3000,
        client
            .post(s.url("/orders"))
            .body("{}")
            .timeout(Duration::from_secs(5))
            .with_extension(CallOptions::new().with_deadline(Duration::from_millis(120)))
            .send(),
    )
    .await
    .unwrap_err();
    let el = t.elapsed();
    assert!(el >= Duration::from_millis(110), "{el:?}");
    assert!(el < Duration::from_millis(1000), "{el:?}");
    let text = err.to_string();
    assert!(
        text.starts_with(
            "the overall deadline of 120ms passed during attempt 1; it may have been processed"
        ),
        "{text}"
    );
    assert!(!text.contains("reqwest's timeout"), "{text}");
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{text}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert_eq!(s.count(), 1);
}

/// options.rs: `with_attempt_timeout` / `without_attempt_timeout` of one request win over the
/// builder's attempt timeout, longer or none, through the middleware: a server answering at
/// 80 ms is answered in one attempt under a builder timeout of 30 ms.
#[tokio::test]
async fn s122_call_options_longer_or_no_attempt_timeout_beats_a_short_builder_timeout() {
    let s = serve(Arc::new(|_, _| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(80)).await;
            status(200)
        })
    }))
    .await;
    let client = mw_client(|next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_attempt_timeout(Duration::from_millis(30))
            .build(next)
    });
    for opts in [
        CallOptions::new().with_attempt_timeout(Duration::from_millis(500)),
        CallOptions::new().without_attempt_timeout(),
    ] {
        let before = s.count();
        let res = within(
            3000,
            client.get(s.url("/slowish")).with_extension(opts).send(),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(s.count() - before, 1);
    }
    // Without options, the builder's 30 ms cuts every attempt.
    let err = within(3000, client.get(s.url("/slowish")).send())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: the attempt timed out after 30ms"
    );
}

// ---------------------------------------------------------------- redirects

fn redirect_then(script: Vec<u16>) -> Handler {
    let target_hits = Arc::new(AtomicUsize::new(0));
    let script = Arc::new(script);
    Arc::new(move |_, rec| {
        let target_hits = target_hits.clone();
        let script = script.clone();
        Box::pin(async move {
            if rec.path == "/a" {
                let mut r = status(307);
                r.headers_mut()
                    .insert("location", http::HeaderValue::from_static("/b"));
                return r;
            }
            let n = target_hits.fetch_add(1, Ordering::SeqCst);
            let code = *script.get(n).or(script.last()).unwrap();
            let mut r = status(code);
            if code == 503 {
                r.headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("0"));
            }
            r
        })
    })
}

/// reqwest.md: "each attempt the stack makes is one reqwest `execute`, redirects included";
/// a POST keeps its idempotency key across attempts. A POST answered 307 whose target says 503
/// is retried from the original URL, with the same key and body on every hop, and the final
/// response's `url()` is the redirect's target.
#[tokio::test]
async fn s122_post_307_to_a_failing_target_is_retried_from_the_original_url_with_one_key() {
    let s = serve(redirect_then(vec![503, 503, 201])).await;
    let client = mw_client(|next| ClientBuilder::new().with_retry(quick_retry()).build(next));
    let res = within(3000, client.post(s.url("/a")).body("order-1").send())
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.url().path(), "/b");
    assert_eq!(s.paths(), ["/a", "/b", "/a", "/b", "/a", "/b"]);
    let keys = s.keys();
    assert!(!keys[0].is_empty());
    assert!(keys.iter().all(|k| k == &keys[0]), "{keys:?}");
    assert!(s
        .recs()
        .iter()
        .all(|r| r.method == "POST" && &r.body[..] == b"order-1"));
}

fn stream_body(chunks: Vec<&'static [u8]>) -> reqwest::Body {
    let frames = chunks
        .into_iter()
        .map(|c| Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from_static(c))));
    reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(frames)))
}

/// reqwest.md, Bodies: "A streaming body ... is read into memory first"; a body held as bytes is
/// one reqwest can send again on a 307. A streamed POST through the middleware that is answered
/// 307 reaches the target whole.
#[tokio::test]
async fn s122_streamed_post_through_the_middleware_follows_a_307_whole() {
    let s = serve(redirect_then(vec![201])).await;
    let client = mw_client(|next| ClientBuilder::new().with_retry(quick_retry()).build(next));
    let res = within(
        3000,
        client
            .post(s.url("/a"))
            .body(stream_body(vec![b"abc", b"def"]))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201, "paths {:?}", s.paths());
    assert_eq!(s.paths(), ["/a", "/b"]);
    assert_eq!(&s.recs()[1].body[..], b"abcdef");
}

/// A 303 turns a POST into a GET (reqwest's policy); the response is the GET's and the call is
/// not retried as a POST. The original POST carried a key.
#[tokio::test]
async fn s122_post_answered_303_ends_with_the_get_and_is_sent_once() {
    let h: Handler = Arc::new(|_, rec| {
        Box::pin(async move {
            if rec.path == "/orders" {
                let mut r = status(303);
                r.headers_mut()
                    .insert("location", http::HeaderValue::from_static("/orders/1"));
                r
            } else {
                status(200)
            }
        })
    });
    let s = serve(h).await;
    let client = mw_client(|next| ClientBuilder::new().with_retry(quick_retry()).build(next));
    let res = within(3000, client.post(s.url("/orders")).body("x").send())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.url().path(), "/orders/1");
    let recs = s.recs();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].method, "POST");
    assert!(recs[0].headers.contains_key("idempotency-key"));
    assert_eq!(recs[1].method, "GET");
}

// ---------------------------------------------------------------- bodies

/// middleware.rs, `with_body_limit`: "Bodies reqwest already holds as bytes (`.body(..)` with
/// bytes or a string, `.json()`, `.form()`) are not limited."
#[tokio::test]
async fn s122_body_limit_does_not_apply_to_bytes_bodies() {
    let s = serve(Arc::new(|_, _| Box::pin(async { status(201) }))).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(
            SturdyMiddleware::new(|next| {
                ClientBuilder::new().with_retry(quick_retry()).build(next)
            })
            .with_body_limit(1),
        )
        .build();
    let res = within(
        3000,
        client.post(s.url("/big")).body(vec![7u8; 200_000]).send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(s.recs()[0].body.len(), 200_000);
    // A streamed one of two bytes is over the limit of one: a Body error, nothing sent.
    let err = within(
        3000,
        client
            .post(s.url("/big"))
            .body(stream_body(vec![b"ab"]))
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Body);
    assert_eq!(delivery(&err), Delivery::NotSent);
    assert_eq!(s.count(), 1);
}

/// A large response (8 MiB) comes back whole through the middleware.
#[tokio::test]
async fn s122_large_response_body_comes_back_whole_through_the_middleware() {
    let big = Bytes::from(
        (0..8 * 1024 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let b2 = big.clone();
    let s = serve(Arc::new(move |_, _| {
        let b = b2.clone();
        Box::pin(async move { Response::new(Full::new(b)) })
    }))
    .await;
    let client = mw_client(|next| ClientBuilder::new().with_retry(quick_retry()).build(next));
    let res = within(5000, client.get(s.url("/big")).send())
        .await
        .unwrap();
    let got = within(5000, res.bytes()).await.unwrap();
    assert_eq!(got.len(), big.len());
    assert!(got == big);
}

/// A raw server: a head announcing 100 bytes, 10 bytes, then a close.
async fn short_body_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

/// reqwest.md: "an API key in a query string shows in neither `Display` nor `Debug`". The body
/// read of a response the middleware handed back, cut short, fails without the key.
#[tokio::test]
#[ignore = "DOCUMENTED since: the reqwest guide says a body read on the returned reqwest::Response is reqwest's own, its errors show the query: convert them with from_reqwest_error"]
async fn s122_body_cut_short_after_the_middleware_shows_no_query_secret() {
    let addr = short_body_server().await;
    let client = mw_client(|next| ClientBuilder::new().with_retry(quick_retry()).build(next));
    let res = within(
        3000,
        client
            .get(format!("http://u:PW122@{addr}/data?api_key=S122SECRET"))
            .send(),
    )
    .await
    .unwrap();
    let err = within(3000, res.bytes()).await.unwrap_err();
    let shown = format!("{err} {err:?}");
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&err);
    let mut chain = String::new();
    while let Some(e) = src {
        chain.push_str(&format!("{e} {e:?} | "));
        src = e.source();
    }
    for secret in ["S122SECRET", "PW122"] {
        assert!(!shown.contains(secret), "{shown}");
        assert!(!chain.contains(secret), "{chain}");
    }
}

// ---------------------------------------------------------------- errors

/// A header value reqwest refuses is a builder error raised by `RequestBuilder::send` before the
/// chain runs: `delivery` says not sent ("a builder error as not sent"), nothing reaches the
/// stack or the server.
#[tokio::test]
async fn s122_invalid_header_value_is_a_builder_error_not_sent_and_never_reaches_the_stack() {
    let s = serve(Arc::new(|_, _| Box::pin(async { status(200) }))).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let client = mw_client(move |next| {
        let counted = tower::service_fn(move |req: http::Request<Full<Bytes>>| {
            c2.fetch_add(1, Ordering::SeqCst);
            next.clone().oneshot(req)
        });
        ClientBuilder::new()
            .with_retry(quick_retry())
            .build(counted)
    });
    let err = within(3000, client.get(s.url("/x")).header("x-bad", "a\nb").send())
        .await
        .unwrap_err();
    assert_eq!(delivery(&err), Delivery::NotSent);
    assert!(find::<reqwest::Error>(&err).unwrap().is_builder());
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(s.count(), 0);
}

/// A `.json()` decode error on a response from the middleware, converted with
/// `from_reqwest_error` ("call this function yourself for errors you get from reqwest
/// directly, such as those of `reqwest::Response::json`"): `Body`, may have been processed,
/// no query secret.
#[tokio::test]
async fn s122_json_decode_error_after_the_middleware_converts_to_body_without_secret() {
    let s = serve(Arc::new(|_, _| {
        Box::pin(async { Response::new(Full::new(Bytes::from_static(b"{not json"))) })
    }))
    .await;
    let client = mw_client(|next| ClientBuilder::new().with_retry(quick_retry()).build(next));
    let res = within(3000, client.get(s.url("/j?token=S122TOK")).send())
        .await
        .unwrap();
    let err = res.json::<serde_json::Value>().await.unwrap_err();
    let err = sturdy::reqwest::from_reqwest_error(err);
    assert_eq!(err.kind(), &ErrorKind::Body);
    assert_eq!(
        sturdy::core::classify::delivery(&err),
        Delivery::MaybeProcessed
    );
    assert!(!format!("{err} {err:?}").contains("S122TOK"));
}

// ---------------------------------------------------------------- breaker

/// circuit/retry docs: `ClientBuilder` puts its attempt timeout under the breaker, so timeouts
/// are counted. Two timed-out calls open a breaker of two consecutive failures; the third call
/// is refused at once, not sent, with `CircuitOpen` findable.
#[tokio::test]
async fn s122_attempt_timeouts_through_the_middleware_open_the_breaker() {
    let s = serve(never()).await;
    let client = mw_client(|next| {
        ClientBuilder::new()
            .with_retry(quick_retry().with_max_attempts(1))
            .with_circuit_breaker(
                CircuitBreakerLayer::new()
                    .with_consecutive_failures(2)
                    .with_open_duration(Duration::from_secs(30), Duration::from_secs(60)),
            )
            .with_attempt_timeout(Duration::from_millis(30))
            .build(next)
    });
    for _ in 0..2 {
        let err = within(2000, client.get(s.url("/t")).send())
            .await
            .unwrap_err();
        assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout, "{err}");
    }
    let t = Instant::now();
    let err = within(2000, client.get(s.url("/t")).send())
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_millis(20));
    assert!(find::<CircuitOpen>(&err).is_some(), "{err}");
    assert_eq!(delivery(&err), Delivery::NotSent);
    assert_eq!(s.count(), 2);
}

// ---------------------------------------------------------------- cancellation

/// "Cancellation": a `send()` future dropped at any point leaves nothing held. With a breaker
/// that opens on one failure, a dropped call counted as a failure would refuse the next call;
/// a call left holding a connection or a slot would stall it.
#[tokio::test]
async fn s122_send_dropped_at_many_points_leaves_the_next_call_normal() {
    let h: Handler = Arc::new(|_, rec| {
        Box::pin(async move {
            if rec.path == "/slow" {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            status(200)
        })
    });
    let s = serve(h).await;
    let client = mw_client(|next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(1))
            .build(next)
    });
    for us in [0u64, 50, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 30_000] {
        let f = client.post(s.url("/slow")).body("x").send();
        let _ = tokio::time::timeout(Duration::from_micros(us), f).await;
        let res = within(2000, client.get(s.url("/fast")).send())
            .await
            .unwrap_or_else(|e| panic!("after a drop at {us} us: {e}"));
        assert_eq!(res.status(), 200);
    }
    // Every dropped POST was sent at most once (no retry after its caller left).
    tokio::time::sleep(Duration::from_millis(60)).await;
    let slow: Vec<_> = s.recs().into_iter().filter(|r| r.path == "/slow").collect();
    let mut keys: Vec<_> = slow
        .iter()
        .map(|r| r.headers["idempotency-key"].clone())
        .collect();
    let n = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), n, "a dropped POST was sent twice");
    assert!(s.conns.load(Ordering::SeqCst) >= 1);
}

// ---------------------------------------------------------------- types

fn assert_clone_send_sync<T: Clone + Send + Sync + 'static>(_: &T) {}
fn assert_send<T: Send>(t: T) -> T {
    t
}

/// reqwest.md: `ReqwestService` "is `Clone + Send + Sync` and always ready"; the middleware
/// client is shared by tasks; the futures are `Send`, so they run under `tokio::spawn`.
#[tokio::test]
async fn s122_clients_are_clone_send_sync_and_futures_send() {
    let s = serve(Arc::new(|_, _| Box::pin(async { status(200) }))).await;
    let mw = mw_client(|next| ClientBuilder::new().with_retry(quick_retry()).build(next));
    assert_clone_send_sync(&mw);
    let svc = ReqwestService::new(reqwest::Client::new());
    assert_clone_send_sync(&svc);
    let stack = ClientBuilder::new().with_retry(quick_retry()).build(svc);
    assert_clone_send_sync(&stack);
    let f = assert_send(mw.get(s.url("/a")).send());
    let req = http::Request::get(s.url("/b"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let g = assert_send(stack.clone().oneshot(req));
    let (a, b) = tokio::join!(tokio::spawn(f), tokio::spawn(g));
    assert_eq!(a.unwrap().unwrap().status(), 200);
    assert_eq!(b.unwrap().unwrap().status(), 200);
    // ReqwestService is always ready: poll_ready answers at once, many times.
    let mut svc2 = ReqwestService::new(reqwest::Client::new());
    for _ in 0..3 {
        tokio_test::assert_ready_ok!(tokio_test::task::spawn(()).enter(|cx, _| {
            tower::Service::<http::Request<Full<Bytes>>>::poll_ready(&mut svc2, cx)
        }));
    }
}

// ---------------------------------------------------------------- extensions and drops

#[derive(Clone, Debug, PartialEq)]
struct Marker(usize);

/// Counts the futures of the rest of the chain still alive.
struct Live(Arc<AtomicUsize>);
impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// After sturdy: marks each attempt with its number and never answers (until dropped).
struct StallAfter {
    attempts: Arc<AtomicUsize>,
    live: Arc<AtomicUsize>,
}

type MwFut<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = reqwest_middleware::Result<reqwest::Response>> + Send + 'a,
    >,
>;

impl reqwest_middleware::Middleware for StallAfter {
    fn handle<'a, 'b, 'c, 'd>(
        &'a self,
        req: reqwest::Request,
        ext: &'b mut http::Extensions,
        next: reqwest_middleware::Next<'c>,
    ) -> MwFut<'d>
    where
        'a: 'd,
        'b: 'd,
        'c: 'd,
        Self: 'd,
    {
        Box::pin(async move {
            let n = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
            ext.insert(Marker(n));
            self.live.fetch_add(1, Ordering::SeqCst);
            let _live = Live(self.live.clone());
            std::future::pending::<()>().await;
            next.run(req, ext).await
        })
    }
}

/// Before sturdy: keeps the call's extensions as they are when the call ends.
struct SeeAfter {
    seen: Arc<Mutex<Option<Option<Marker>>>>,
}

impl reqwest_middleware::Middleware for SeeAfter {
    fn handle<'a, 'b, 'c, 'd>(
        &'a self,
        req: reqwest::Request,
        ext: &'b mut http::Extensions,
        next: reqwest_middleware::Next<'c>,
    ) -> MwFut<'d>
    where
        'a: 'd,
        'b: 'd,
        'c: 'd,
        Self: 'd,
    {
        Box::pin(async move {
            let r = next.run(req, ext).await;
            *self.seen.lock().unwrap() = Some(ext.get::<Marker>().cloned());
            r
        })
    }
}

fn stall_chain(
    make: impl FnOnce(sturdy::reqwest::NextAttempt) -> sturdy::Client<reqwest::Body>
        + Send
        + Sync
        + 'static,
) -> (
    reqwest_middleware::ClientWithMiddleware,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    Arc<Mutex<Option<Option<Marker>>>>,
) {
    let attempts = Arc::new(AtomicUsize::new(0));
    let live = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(None));
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SeeAfter { seen: seen.clone() })
        .with(SturdyMiddleware::new(make))
        .with(StallAfter {
            attempts: attempts.clone(),
            live: live.clone(),
        })
        .build();
    (client, attempts, live, seen)
}

/// reqwest.md, Per-request settings: "when the call ends, the call's extensions are replaced by
/// those of the last attempt that finished or was given up (an attempt the stack abandoned, at
/// its timeout or the call's deadline, counts)"; Cancellation: the rest of the chain's future
/// is dropped. Here the only attempt is abandoned at the call's deadline.
#[tokio::test]
async fn s122_attempt_abandoned_at_the_deadline_gives_its_extensions_and_is_dropped() {
    let (client, attempts, live, seen) = stall_chain(|next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_attempt_timeout(Duration::from_secs(5))
            .build(next)
    });
    let err = within(
        3000,
        client
            .get("http://127.0.0.1:9/never")
            .with_extension(CallOptions::new().with_deadline(Duration::from_millis(60)))
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout, "{err}");
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert_eq!(*seen.lock().unwrap(), Some(Some(Marker(1))));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        live.load(Ordering::SeqCst),
        0,
        "the abandoned attempt is still alive"
    );
}

/// The same after three attempts each cut by sturdy's attempt timeout: the last one's marker.
#[tokio::test]
async fn s122_attempts_cut_by_the_attempt_timeout_give_the_last_ones_extensions() {
    let (client, attempts, live, seen) = stall_chain(|next| {
        ClientBuilder::new()
            .with_retry(quick_retry().with_max_attempts(3))
            .with_attempt_timeout(Duration::from_millis(25))
            .build(next)
    });
    let err = within(3000, client.get("http://127.0.0.1:9/never").send())
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("gave up after 3 attempts"),
        "{err}"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(*seen.lock().unwrap(), Some(Some(Marker(3))));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(live.load(Ordering::SeqCst), 0);
}

/// A caller that drops `send()` mid-attempt: the rest of the chain's future is dropped too
/// (nothing kept running for a caller that left), and the next call runs normally.
#[tokio::test]
async fn s122_caller_dropping_send_drops_the_rest_of_the_chain() {
    let (client, attempts, live, _seen) = stall_chain(|next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_attempt_timeout(Duration::from_secs(5))
            .build(next)
    });
    for ms in [1u64, 5, 20] {
        let _ = tokio::time::timeout(
            Duration::from_millis(ms),
            client.get("http://127.0.0.1:9/never").send(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(live.load(Ordering::SeqCst), 0, "after a drop at {ms} ms");
    }
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "one attempt per call, none after a drop"
    );
}

/// options.rs: "A value set here wins over the layer's configuration for this request only".
/// A call deadline longer than the retry layer's own lets a slow answer through; the next call
/// without options keeps the layer's deadline.
#[tokio::test]
async fn s122_call_options_deadline_longer_than_the_layers_wins_for_that_call() {
    let s = serve(Arc::new(|_, _| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            status(200)
        })
    }))
    .await;
    let client = mw_client(|next| {
        ClientBuilder::new()
            .with_retry(quick_retry().with_deadline(Duration::from_millis(50)))
            .build(next)
    });
    let res = within(
        3000,
        client
            .get(s.url("/slow"))
            .with_extension(CallOptions::new().with_deadline(Duration::from_millis(800)))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let err = within(3000, client.get(s.url("/slow")).send())
        .await
        .unwrap_err();
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout, "{err}");
    assert!(err.to_string().contains("deadline of 50ms"), "{err}");
}

/// A raw server: `/a` answers 307 to `/b`; the first request to `/b` is read and its
/// connection closed without an answer, later ones get 201. Records the request lines and
/// idempotency keys.
async fn redirect_then_close() -> (SocketAddr, Arc<Mutex<Vec<(String, String)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let s2 = seen.clone();
    let b_hits = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = s2.clone();
            let b_hits = b_hits.clone();
            tokio::spawn(async move {
                loop {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Read one request: head, then the content-length body.
                    let (head, body_len) = loop {
                        let n = match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                            break (head, i + 4 + len);
                        }
                    };
                    while buf.len() < body_len {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let line = head.lines().next().unwrap_or("").to_owned();
                    let key = head
                        .lines()
                        .find_map(|l| l.strip_prefix("idempotency-key:"))
                        .unwrap_or("")
                        .trim()
                        .to_owned();
                    seen.lock().unwrap().push((line.clone(), key));
                    if line.starts_with("post /a ") {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 307 Temporary Redirect\r\nlocation: /b\r\ncontent-length: 0\r\n\r\n")
                            .await;
                    } else if b_hits.fetch_add(1, Ordering::SeqCst) == 0 {
                        return; // closed after reading: may have been processed
                    } else {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
                            .await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// reqwest.md: "a reset or an early close is `Transport`", may have been processed, retried
/// "with an idempotency key"; the retry starts again at the request's own URL. A keyed POST whose
/// redirect target closes after reading is resent from `/a` with the same key; a POST without a
/// key (no idempotency layer) is not resent.
#[tokio::test]
async fn s122_redirected_post_closed_at_the_target_is_retried_from_the_start_with_its_key() {
    let (addr, seen) = redirect_then_close().await;
    let client = mw_client(|next| ClientBuilder::new().with_retry(quick_retry()).build(next));
    let res = within(
        3000,
        client.post(format!("http://{addr}/a")).body("o").send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.url().path(), "/b");
    let seen = seen.lock().unwrap().clone();
    let lines: Vec<_> = seen.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        lines,
        [
            "post /a http/1.1",
            "post /b http/1.1",
            "post /a http/1.1",
            "post /b http/1.1"
        ]
    );
    assert!(!seen[0].1.is_empty());
    assert!(seen.iter().all(|(_, k)| k == &seen[0].1), "{seen:?}");

    let (addr, seen) = redirect_then_close().await;
    let client = mw_client(|next| {
        ClientBuilder::new()
            .without_idempotency()
            .with_retry(quick_retry())
            .build(next)
    });
    let err = within(
        3000,
        client.post(format!("http://{addr}/a")).body("o").send(),
    )
    .await
    .unwrap_err();
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Transport, "{err}");
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "a POST without a key is not resent"
    );
}
