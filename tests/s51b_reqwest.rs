#![cfg(feature = "full")]
//! s51b: `sturdy::reqwest` (`SturdyMiddleware` in a reqwest-middleware chain) against small
//! hyper servers on 127.0.0.1, checked against docs/guides/reqwest.md: retries and
//! `Retry-After`, one idempotency key per POST across its attempts, a 429 pausing the host,
//! the breaker, the words of errors ("not sent" vs "may have been processed"), clones shared
//! by tasks, bodies reqwest cannot clone, and calls dropped mid-way that must leave nothing
//! held (rate slot, breaker probe, concurrency permit).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::TokioIo;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::{CallOptions, CircuitOpen, Delivery, ErrorKind};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::reqwest::{delivery, find, SturdyMiddleware};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;

#[derive(Clone, Debug)]
struct Rec {
    at: Instant,
    method: String,
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
}

type Handler = Arc<dyn Fn(usize, Rec) -> BoxFuture<'static, Response<Full<Bytes>>> + Send + Sync>;

struct Srv {
    addr: SocketAddr,
    recs: Arc<Mutex<Vec<Rec>>>,
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
    let r2 = recs.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
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
                            at: Instant::now(),
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
    Srv { addr, recs }
}

fn status(code: u16) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

fn with_header(
    mut r: Response<Full<Bytes>>,
    k: &'static str,
    v: &'static str,
) -> Response<Full<Bytes>> {
    r.headers_mut().insert(k, http::HeaderValue::from_static(v));
    r
}

/// Answers `script[n]` (the last one afterwards); 0 means "never answer".
fn scripted(script: Vec<(u16, Option<&'static str>)>) -> Handler {
    let script = Arc::new(script);
    Arc::new(move |n, _rec| {
        let (code, ra) = *script.get(n).or(script.last()).unwrap();
        Box::pin(async move {
            if code == 0 {
                std::future::pending::<()>().await;
            }
            let r = status(code);
            match ra {
                Some(v) => with_header(r, "retry-after", v),
                None => r,
            }
        })
    })
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10))
                .unwrap(),
        )
        .with_seed(51)
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

fn default_client() -> reqwest_middleware::ClientWithMiddleware {
    mw_client(|next| ClientBuilder::new().with_retry(quick_retry()).build(next))
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("the call did not end in time")
}

/// reqwest.md: "Two 503s, then the order: one idempotency key for the three attempts." And
/// idempotency.md: "sets one random UUID v4 per logical POST/PATCH; every retry carries the
/// same key".
#[tokio::test]
async fn s51b_reqwest_post_keeps_one_key_across_attempts_and_a_new_one_per_call() {
    let s = serve(scripted(vec![
        (503, Some("0")),
        (503, Some("0")),
        (201, None),
        (503, Some("0")),
        (201, None),
    ]))
    .await;
    let client = default_client();
    for _ in 0..2 {
        let res = within(
            10,
            client
                .post(s.url("/orders"))
                .json(&serde_json::json!({"item": "book"}))
                .send(),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 201);
    }
    let keys = s.keys();
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert!(!keys[0].is_empty());
    assert_eq!(keys[0], keys[1]);
    assert_eq!(keys[1], keys[2]);
    assert_eq!(keys[3], keys[4]);
    assert_ne!(keys[0], keys[3], "a new call must get a new key");
    // UUID v4: 8-4-4-4-12 hex, version nibble 4.
    for k in [&keys[0], &keys[3]] {
        let parts: Vec<&str> = k.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{k}"
        );
        assert!(parts[2].starts_with('4'), "{k}");
    }
    // Every attempt carried the whole JSON body.
    for r in s.recs() {
        assert_eq!(r.method, "POST");
        assert_eq!(&r.body[..], br#"{"item":"book"}"#);
    }
}

/// idempotency.md: "A key you set yourself is kept: put it in the `Idempotency-Key` header".
#[tokio::test]
async fn s51b_reqwest_a_users_key_is_kept_on_every_attempt() {
    let s = serve(scripted(vec![(503, Some("0")), (502, None), (201, None)])).await;
    let res = within(
        10,
        default_client()
            .post(s.url("/orders"))
            .header("Idempotency-Key", "order-77")
            .body("x")
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(s.keys(), ["order-77", "order-77", "order-77"]);
}

/// retry.md / reqwest.md: a `Retry-After` is honoured: never sooner.
#[tokio::test]
async fn s51b_reqwest_retry_after_one_second_is_waited_out() {
    let s = serve(scripted(vec![(503, Some("1")), (200, None)])).await;
    let res = within(10, default_client().get(s.url("/orders")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let recs = s.recs();
    assert_eq!(recs.len(), 2);
    let gap = recs[1].at - recs[0].at;
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    assert!(gap < Duration::from_secs(3), "retried after {gap:?}");
}

/// README: "RateLimit -> one permit per attempt; global pause on 429 / RateLimit headers";
/// ClientBuilder's default rate limiter "pauses on 429 and quota headers". A 429 with
/// `Retry-After: 1` to one call holds the next call to the same host until the pause ends.
#[tokio::test]
async fn s51b_reqwest_a_429_pauses_the_next_call_to_the_host() {
    let s = serve(scripted(vec![(429, Some("1")), (200, None)])).await;
    let client = default_client();
    let first = within(
        10,
        client
            .get(s.url("/a"))
            .with_extension(CallOptions::new().without_retries())
            .send(),
    )
    .await;
    // Either the 429 itself or a RateLimited error: the server's word reached the caller.
    match &first {
        Ok(res) => assert_eq!(res.status(), 429),
        Err(e) => assert!(
            find::<sturdy::core::RateLimited>(e).is_some(),
            "{e} / {e:?}"
        ),
    }
    let res = within(10, client.get(s.url("/b")).send()).await.unwrap();
    assert_eq!(res.status(), 200);
    let recs = s.recs();
    assert_eq!(
        recs.len(),
        2,
        "{:?}",
        recs.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    let gap = recs[1].at - recs[0].at;
    assert!(
        gap >= Duration::from_millis(900),
        "the call after the 429 reached the server {gap:?} later"
    );
}

/// circuit.md: "Open: `CircuitOpen { retry_in }` at once, and the inner service is not
/// called"; agents.md: "may have been processed" is false for an open breaker.
#[tokio::test]
async fn s51b_reqwest_open_breaker_refuses_at_once_and_says_not_sent() {
    let s = serve(scripted(vec![(500, None)])).await;
    let client = mw_client(|next| {
        ClientBuilder::new()
            .without_retry()
            .with_circuit_breaker(
                CircuitBreakerLayer::new()
                    .with_consecutive_failures(2)
                    .with_open_duration(Duration::from_secs(30), Duration::from_secs(30)),
            )
            .build(next)
    });
    for _ in 0..2 {
        let res = within(5, client.get(s.url("/x")).send()).await.unwrap();
        assert_eq!(res.status(), 500);
    }
    let t = Instant::now();
    let err = within(5, client.get(s.url("/x")).send()).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(s.count(), 2, "the open breaker let a request through");
    let open = find::<CircuitOpen>(&err).unwrap_or_else(|| panic!("{err} / {err:?}"));
    assert!(open.retry_in() > Duration::from_secs(20));
    assert_eq!(delivery(&err), Delivery::NotSent, "{err}");
    let summary = sturdy::core::ErrorSummary::of(&err);
    assert!(!summary.may_have_been_processed, "{summary:?}");
    assert_eq!(summary.kind, "circuit_open", "{summary:?}");
}

/// reqwest.md: "`gave up after 4 attempts: connection refused` (for a GET; a POST's goes on
/// with what to do next, as in the retry guide)"; retry.md: "otherwise `...; it may have been
/// processed: retry with the same idempotency key <key>`".
#[tokio::test]
async fn s51b_reqwest_refused_post_says_may_have_been_processed_with_its_key() {
    let port = closed_port();
    let err = within(
        10,
        default_client()
            .post(format!("http://127.0.0.1:{port}/orders"))
            .body("{}")
            .send(),
    )
    .await
    .unwrap_err();
    let e = find::<sturdy::core::Error>(&err).unwrap();
    let key = e.report().unwrap().idempotency_key().unwrap().to_owned();
    assert_eq!(e.report().unwrap().attempts(), 4);
    assert_eq!(
        err.to_string(),
        format!(
            "gave up after 4 attempts: connection refused; it may have been processed: retry with the same idempotency key {key}"
        )
    );
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    let summary = sturdy::core::ErrorSummary::of(&err);
    assert_eq!(summary.idempotency_key.as_deref(), Some(key.as_str()));
    assert_eq!(summary.attempts, Some(4));
}

/// reqwest.md: "`timed out (reqwest's timeout)`... The retry layer puts it after its summary:
/// `gave up after 4 attempts: timed out (reqwest's timeout)`."
#[tokio::test]
async fn s51b_reqwest_timeout_of_each_attempt_is_named() {
    let s = serve(scripted(vec![(0, None)])).await;
    let err = within(
        10,
        default_client()
            .get(s.url("/slow?api_key=hunter2"))
            .timeout(Duration::from_millis(50))
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: timed out (reqwest's timeout)"
    );
    assert_eq!(s.count(), 4);
    let e = find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert!(!format!("{err:?}").contains("hunter2"));
}

/// agents.md: the client "is `Clone + Send + Sync`"; reqwest.md: "the stack is built once, so
/// every call shares its breakers, limits, retry budgets and token caches".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s51b_reqwest_clones_are_shared_by_many_tasks() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>(_: &T) {}
    let s = serve(scripted(vec![(200, None)])).await;
    let (cb, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1000)
        .pair();
    let client = mw_client(move |next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_circuit_breaker(cb)
            .build(next)
    });
    assert_send_sync(&client);
    let mut tasks = Vec::new();
    for i in 0..32 {
        let c = client.clone();
        let url = s.url(&format!("/orders/{i}"));
        tasks.push(tokio::spawn(async move {
            c.post(url)
                .body(format!("{i}"))
                .send()
                .await
                .map(|r| r.status())
        }));
    }
    for t in tasks {
        assert_eq!(within(10, t).await.unwrap().unwrap(), 200);
    }
    assert_eq!(s.count(), 32);
    // One set of breakers for all clones: exactly one breaker, for the one host.
    assert_eq!(handle.states().len(), 1, "{:?}", handle.states());
    // Every call had a key of its own.
    let mut keys = s.keys();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 32);
}

fn stream_body(chunks: Vec<&'static [u8]>) -> reqwest::Body {
    let frames = chunks
        .into_iter()
        .map(|c| Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from_static(c))));
    reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(frames)))
}

/// reqwest.md, Bodies: "A streaming body (`reqwest::Body::wrap`, multipart) is read into memory
/// first ... bodies up to its `with_body_limit` \[1 MiB\] are replayed".
#[tokio::test]
async fn s51b_reqwest_a_body_reqwest_cannot_clone_is_replayed_whole_with_one_key() {
    let s = serve(scripted(vec![(503, Some("0")), (500, None), (201, None)])).await;
    let res = within(
        10,
        default_client()
            .post(s.url("/upload"))
            .body(stream_body(vec![b"one ", b"two ", b"three"]))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    let recs = s.recs();
    assert_eq!(recs.len(), 3);
    for r in &recs {
        assert_eq!(&r.body[..], b"one two three");
    }
    let keys = s.keys();
    assert!(!keys[0].is_empty());
    assert!(keys.iter().all(|k| k == &keys[0]), "{keys:?}");
}

/// A body whose stream fails before its end: the call fails before anything is sent.
#[tokio::test]
async fn s51b_reqwest_a_body_that_fails_while_read_is_never_sent() {
    let s = serve(scripted(vec![(201, None)])).await;
    let frames = vec![
        Ok(hyper::body::Frame::data(Bytes::from_static(b"half"))),
        Err(std::io::Error::other("disk gone")),
    ];
    let body = reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(frames)));
    let err = within(
        10,
        default_client().post(s.url("/upload")).body(body).send(),
    )
    .await
    .unwrap_err();
    assert_eq!(s.count(), 0);
    assert_eq!(delivery(&err), Delivery::NotSent, "{err} / {err:?}");
    let e = find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Body, "{err}");
}

/// ratelimit: "waits in a fair line that a dropped caller leaves". A call waiting for a rate
/// slot, dropped, leaves the line; the call after it is not delayed by the dropped one.
#[tokio::test]
async fn s51b_reqwest_dropped_call_waiting_for_a_rate_slot_leaves_the_line() {
    let s = serve(scripted(vec![(200, None)])).await;
    let (rl, rh) = RateLimitLayer::new(Quota::new(1, Duration::from_millis(400)).unwrap()).pair();
    let client = mw_client(move |next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_rate_limit(rl)
            .build(next)
    });
    let key = s.addr.to_string();
    let t0 = Instant::now();
    within(5, client.get(s.url("/1")).send()).await.unwrap();
    // The second waits for the next slot (about 400 ms); drop it after 50 ms.
    let second =
        tokio::time::timeout(Duration::from_millis(50), client.get(s.url("/2")).send()).await;
    assert!(second.is_err(), "the second call did not wait for its slot");
    assert_eq!(rh.waiting(&key), 0, "a dropped caller is still in line");
    // The third takes the slot the dropped one would have had.
    within(5, client.get(s.url("/3")).send()).await.unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(700),
        "the third call waited behind the dropped one: {took:?}"
    );
    let paths: Vec<String> = s.recs().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/1", "/3"]);
}

/// circuit.md: "A probe whose future is dropped gives its slot back."
#[tokio::test]
async fn s51b_reqwest_dropped_probe_gives_its_slot_back() {
    // 500 opens the breaker, the probe stalls, then 200.
    let s = serve(scripted(vec![(500, None), (0, None), (200, None)])).await;
    let (cb, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_millis(100), Duration::from_millis(100))
        .pair();
    let client = mw_client(move |next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_circuit_breaker(cb)
            .build(next)
    });
    let key = s.addr.to_string();
    let res = within(
        5,
        client
            .get(s.url("/x"))
            .with_extension(CallOptions::new().without_retries())
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 500);
    assert!(
        matches!(
            handle.state(&key),
            Some(sturdy::circuit::CircuitState::Open { .. })
        ),
        "{:?}",
        handle.states()
    );
    // The probe: waits for the open period under its deadline, is sent, stalls; dropped.
    let probe = tokio::time::timeout(
        Duration::from_millis(600),
        client
            .get(s.url("/x"))
            .with_extension(CallOptions::new().with_deadline(Duration::from_secs(5)))
            .send(),
    )
    .await;
    assert!(probe.is_err());
    assert_eq!(s.count(), 2, "the probe was not sent");
    // The next call becomes the probe (no "Probing" refusal until its deadline).
    let res = within(
        5,
        client
            .get(s.url("/x"))
            .with_extension(CallOptions::new().with_deadline(Duration::from_secs(2)))
            .send(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e} / {:?}", handle.states()));
    assert_eq!(res.status(), 200);
}

/// README: "Concurrency -> (optional) adaptive per-host limit, held for the attempt only"; a
/// call dropped mid-attempt gives its place back.
#[tokio::test]
async fn s51b_reqwest_dropped_attempt_frees_its_concurrency_place() {
    let s = serve(scripted(vec![(0, None), (200, None)])).await;
    let (ac, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .with_max_wait(Duration::from_millis(100))
        .pair();
    let client = mw_client(move |next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_adaptive_concurrency(ac)
            .build(next)
    });
    let key = s.addr.to_string();
    let stalled =
        tokio::time::timeout(Duration::from_millis(200), client.get(s.url("/a")).send()).await;
    assert!(stalled.is_err());
    assert_eq!(s.count(), 1);
    let st = handle.state(&key).expect("a limit for the host");
    assert_eq!(
        st.in_flight(),
        0,
        "the dropped attempt still holds its place"
    );
    let res = within(5, client.get(s.url("/b")).send())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.status(), 200);
}

/// A call dropped while waiting out a `Retry-After` sends nothing more, and the same client's
/// next call works at once (nothing held by the dropped one).
#[tokio::test]
async fn s51b_reqwest_dropped_during_a_retry_wait_sends_nothing_more() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    let s = serve(Arc::new(move |_n, rec: Rec| {
        let h2 = h2.clone();
        Box::pin(async move {
            if rec.path == "/wait" {
                h2.fetch_add(1, Ordering::SeqCst);
                with_header(status(503), "retry-after", "2")
            } else {
                status(200)
            }
        })
    }))
    .await;
    let client = default_client();
    let r = tokio::time::timeout(
        Duration::from_millis(300),
        client.get(s.url("/wait")).send(),
    )
    .await;
    assert!(r.is_err());
    // ratelimit.md: "a 429 or 503 with `Retry-After`" pauses the host: the next call waits
    // out the pause, then goes.
    let res = within(5, client.get(s.url("/other")).send()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the dropped call sent again"
    );
}

/// reqwest.md, Bodies: "Whether a retry replays a body is the retry layer's decision: bodies up
/// to its `with_body_limit` \[1 MiB\] are replayed, a larger one is sent once." A 2 MiB
/// streaming POST answered 503 is sent once, whole, and the 503 comes back.
#[tokio::test]
async fn s51b_reqwest_a_streamed_body_over_the_replay_limit_is_sent_once() {
    let s = serve(scripted(vec![(503, None), (201, None)])).await;
    let chunk: &'static [u8] = Box::leak(vec![b'z'; 64 * 1024].into_boxed_slice());
    let res = within(
        20,
        default_client()
            .post(s.url("/big"))
            .body(stream_body(vec![chunk; 32]))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 503);
    let recs = s.recs();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].body.len(), 2 * 1024 * 1024);
}

/// circuit.md: "a dropped call is not counted" (neither failure nor success). A 500, a call
/// dropped mid-attempt, then a 500: a breaker that opens on 2 failures in a row is closed
/// after the drop (the drop was no failure) and open after the second 500 (nor a success).
#[tokio::test]
async fn s51b_reqwest_a_dropped_call_is_not_counted_by_the_breaker() {
    let s = serve(scripted(vec![
        (500, None),
        (0, None),
        (500, None),
        (200, None),
    ]))
    .await;
    let (cb, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_open_duration(Duration::from_secs(30), Duration::from_secs(30))
        .pair();
    let client = mw_client(move |next| {
        ClientBuilder::new()
            .without_retry()
            .with_circuit_breaker(cb)
            .build(next)
    });
    let key = s.addr.to_string();
    assert_eq!(
        within(5, client.get(s.url("/1")).send())
            .await
            .unwrap()
            .status(),
        500
    );
    let dropped =
        tokio::time::timeout(Duration::from_millis(200), client.get(s.url("/2")).send()).await;
    assert!(dropped.is_err());
    assert_eq!(
        handle.state(&key),
        Some(sturdy::circuit::CircuitState::Closed),
        "the dropped call counted as a failure"
    );
    assert_eq!(
        within(5, client.get(s.url("/3")).send())
            .await
            .unwrap()
            .status(),
        500
    );
    assert!(
        matches!(
            handle.state(&key),
            Some(sturdy::circuit::CircuitState::Open { .. })
        ),
        "the dropped call counted as a success: {:?}",
        handle.states()
    );
}

/// A call dropped while waiting in line for a place of the adaptive concurrency limit leaves
/// the line: nobody is counted waiting, and the place goes to the next call.
#[tokio::test]
async fn s51b_reqwest_dropped_call_waiting_for_a_concurrency_place_leaves_the_line() {
    let release = Arc::new(tokio::sync::Notify::new());
    let r2 = release.clone();
    let s = serve(Arc::new(move |_n, rec: Rec| {
        let r2 = r2.clone();
        Box::pin(async move {
            if rec.path == "/hold" {
                r2.notified().await;
            }
            status(200)
        })
    }))
    .await;
    let (ac, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .with_max_wait(Duration::from_secs(10))
        .pair();
    let client = mw_client(move |next| {
        ClientBuilder::new()
            .with_retry(quick_retry())
            .with_adaptive_concurrency(ac)
            .build(next)
    });
    let key = s.addr.to_string();
    let c = client.clone();
    let url = s.url("/hold");
    let holder = tokio::spawn(async move { c.get(url).send().await.map(|r| r.status()) });
    // Wait until the holder is at the server.
    within(5, async {
        while s.count() == 0 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let waiter =
        tokio::time::timeout(Duration::from_millis(150), client.get(s.url("/w")).send()).await;
    assert!(waiter.is_err(), "the waiter did not wait");
    let st = handle.state(&key).unwrap();
    assert_eq!(st.waiting(), 0, "a dropped waiter is still in line");
    release.notify_one();
    assert_eq!(within(5, holder).await.unwrap().unwrap(), 200);
    let res = within(5, client.get(s.url("/after")).send()).await.unwrap();
    assert_eq!(res.status(), 200);
    let paths: Vec<String> = s.recs().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/hold", "/after"]);
    assert_eq!(handle.state(&key).unwrap().in_flight(), 0);
}

/// reqwest.md: "a request that has [a `.timeout()`] is never coalesced with another
/// (`with_coalesce`): it is sent on its own, under its own timeout"; identical GETs without
/// one share one request.
#[tokio::test]
async fn s51b_reqwest_a_request_with_its_own_timeout_is_never_coalesced() {
    let release = Arc::new(tokio::sync::Notify::new());
    let r2 = release.clone();
    let s = serve(Arc::new(move |_n, _rec: Rec| {
        let r2 = r2.clone();
        Box::pin(async move {
            tokio::time::timeout(Duration::from_millis(300), r2.notified())
                .await
                .ok();
            status(200)
        })
    }))
    .await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_coalesce(CoalesceLayer::new())
                .build(next)
        }))
        .build();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let c = client.clone();
        let url = s.url("/same");
        tasks.push(tokio::spawn(async move {
            let mut rb = c.get(url);
            if i % 2 == 1 {
                rb = rb.timeout(Duration::from_secs(5));
            }
            rb.send().await.map(|r| r.status())
        }));
    }
    for t in tasks {
        assert_eq!(within(10, t).await.unwrap().unwrap(), 200);
    }
    // Three with a timeout, each on its own; three without, sharing one request.
    assert_eq!(
        s.count(),
        4,
        "{:?}",
        s.recs().iter().map(|r| &r.path).collect::<Vec<_>>()
    );
}

/// RELIABILITY.md: a pause asked by `Retry-After` is "at most `max_pause` \[5 min\]"; agents.md:
/// `retry_after_ms` is "a server's wait capped at 5 min". A hostile `Retry-After` through
/// reqwest: the caller is told 5 min, and the next call to the host, which would wait 5 min
/// (more than `max_wait` \[30 s\]), is refused at once without being sent.
#[tokio::test]
async fn s51b_reqwest_a_hostile_retry_after_is_capped_and_the_next_call_refused_unsent() {
    let srv = serve(scripted(vec![
        (429, Some("99999999999999999999")),
        (200, None),
    ]))
    .await;
    let client = default_client();
    let err = within(5, client.get(srv.url("/a")).send())
        .await
        .unwrap_err();
    let summary = sturdy::core::ErrorSummary::of(&err);
    assert_eq!(summary.kind, "rate_limited", "{summary:?}");
    assert_eq!(summary.retry_after_ms, Some(300_000), "{summary:?}");
    assert!(err.to_string().ends_with("retry after 5m"), "{err}");
    let t = Instant::now();
    let err = within(5, client.get(srv.url("/b")).send())
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(find::<sturdy::core::RateLimited>(&err).is_some(), "{err}");
    assert_eq!(delivery(&err), Delivery::NotSent, "{err}");
    assert_eq!(srv.count(), 1);
}

/// RELIABILITY.md: "a client that times out while the server's handler runs | ... | once; the
/// retry gets the stored response"; idempotency.md: the retry "gets 409 in flight
/// (`Retry-After: 1`) while the handler runs, then the stored response with
/// `Idempotent-Replayed: true`; the handler ran once". End to end: reqwest with
/// `SturdyMiddleware` (attempt timeout 100 ms) against an axum app under the server layer whose
/// handler takes 400 ms.
#[tokio::test]
async fn s51b_reqwest_a_timed_out_post_is_answered_from_the_store_and_runs_once() {
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let app: axum::Router = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: String| {
                let r2 = r2.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    let n = r2.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, format!("order {n}: {body}"))
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = mw_client(|next| {
        ClientBuilder::new()
            .with_retry(quick_retry().with_max_attempts(6))
            .with_attempt_timeout(Duration::from_millis(100))
            .build(next)
    });
    let res = within(
        15,
        client
            .post(format!("http://{addr}/orders"))
            .body("book")
            .send(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.status(), 201);
    assert_eq!(
        res.headers()
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(res.text().await.unwrap(), "order 0: book");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// coalesce.md: "Errors are shared too: ... each caller gets a `sturdy_core::Error` whose kind
/// and delivery are the shared error's ..., with the message "the call shared by identical
/// requests in flight failed: <the error>" ... the caller's error carries a copy [of the
/// `CallReport`], so `err.report()` on the top-level error answers as it would without
/// coalescing." Through reqwest, to a port nothing listens on.
#[tokio::test]
async fn s51b_reqwest_a_shared_failure_reaches_every_caller_with_its_report() {
    let port = closed_port();
    let retry = RetryLayer::new()
        .with_backoff(
            Backoff::exponential(Duration::from_millis(40), Duration::from_millis(40)).unwrap(),
        )
        .with_seed(51);
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(retry)
                .with_coalesce(CoalesceLayer::new())
                .build(next)
        }))
        .build();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let c = client.clone();
        let url = format!("http://127.0.0.1:{port}/orders");
        tasks.push(tokio::spawn(
            async move { c.get(url).send().await.unwrap_err() },
        ));
    }
    let mut shared = 0;
    for t in tasks {
        let err = within(10, t).await.unwrap();
        let text = err.to_string();
        if let Some(rest) =
            text.strip_prefix("the call shared by identical requests in flight failed: ")
        {
            shared += 1;
            assert_eq!(rest, "gave up after 4 attempts: connection refused");
        } else {
            assert_eq!(text, "gave up after 4 attempts: connection refused");
        }
        assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{text}");
        let e = find::<sturdy::core::Error>(&err).unwrap();
        assert_eq!(e.kind(), &ErrorKind::Connect, "{text}");
        assert_eq!(
            e.report().map(|r| r.attempts()),
            Some(4),
            "{text}: the caller's error has no report"
        );
        let summary = sturdy::core::ErrorSummary::of(&err);
        assert_eq!(summary.attempts, Some(4), "{text}: {summary:?}");
    }
    assert!(shared >= 1, "nobody joined the shared call");
}

/// reqwest.md, Per-request settings: "`.with_extension(sturdy_core::CallOptions::new()...)`
/// ... reach the layers"; idempotency.md: a `CallOptions` key is sent as given, or as its
/// digest when HTTP cannot carry it, on every attempt.
#[tokio::test]
async fn s51b_reqwest_call_option_keys_reach_the_wire() {
    let s = serve(scripted(vec![(503, Some("0"))])).await;
    let client = default_client();
    for key in ["order-9", "a\r\nb"] {
        let res = within(
            10,
            client
                .post(s.url("/orders"))
                .body("{}")
                .with_extension(
                    CallOptions::new()
                        .with_idempotency_key(key)
                        .with_max_attempts(2),
                )
                .send(),
        )
        .await;
        match res {
            Ok(r) => assert_eq!(r.status(), 503),
            Err(e) => {
                let text = e.to_string();
                assert!(!text.contains('\r'), "{text:?}");
            }
        }
    }
    let keys = s.keys();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert_eq!(&keys[..2], ["order-9", "order-9"]);
    assert!(
        keys[2].starts_with("sturdy-sha256-") && keys[2].len() == 14 + 64,
        "{keys:?}"
    );
    assert_eq!(keys[2], keys[3]);
}
