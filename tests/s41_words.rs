//! s41: the words and edges of docs/guides/retry.md and docs/guides/idempotency.md: keys no header
//! can carry, `Retry-After` at its bounds and as a date, secrets in URIs, the server layer without
//! a tokio runtime and inside a `tracing` span; through the public API, in process.

#![cfg(feature = "full")]

use std::future::Future;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::core::clock::ManualClock;
use sturdy::core::{BoxError, CallOptions, Delivery, ErrorKind, RateLimited};
use sturdy::idempotency::server::{problem, ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Records each request's `Idempotency-Key` values and time; answers from `status` (with an
/// optional `Retry-After`) until `fails` requests have been answered, then 200.
#[derive(Clone)]
struct Server {
    seen: Arc<Mutex<Vec<(Vec<Vec<u8>>, Instant)>>>,
    status: u16,
    retry_after: Option<String>,
    fails: usize,
}

impl Server {
    fn new(status: u16, retry_after: Option<&str>, fails: usize) -> Self {
        Self {
            seen: Arc::default(),
            status,
            retry_after: retry_after.map(str::to_owned),
            fails,
        }
    }
    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    fn gap(&self) -> Duration {
        let s = self.seen.lock().unwrap();
        s[1].1 - s[0].1
    }
    fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let me = self.clone();
        service_fn(move |r: Request<Full<Bytes>>| {
            let me = me.clone();
            async move {
                let n = {
                    let mut s = me.seen.lock().unwrap();
                    s.push((
                        r.headers()
                            .get_all("idempotency-key")
                            .iter()
                            .map(|v| v.as_bytes().to_vec())
                            .collect(),
                        Instant::now(),
                    ));
                    s.len()
                };
                let mut b = Response::builder();
                if n <= me.fails {
                    b = b.status(me.status);
                    if let Some(ra) = &me.retry_after {
                        b = b.header("retry-after", ra.as_str());
                    }
                }
                Ok::<_, BoxError>(b.body(Full::new(Bytes::new())).unwrap())
            }
        })
    }
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::new(Bytes::new())).unwrap()
}

/// idempotency.md, "Client": "a key there that no header can carry as it is, because it is
/// empty, holds control characters, or begins or ends with a space or a tab ... is sent as
/// `sturdy-sha256-` and the hex SHA-256 of the key: ...; the value sent is the key a failed call
/// reports". DEL, NUL or ESC inside the key, a tab at its end: each key is sent as its digest,
/// on every attempt; a space inside a key is not a control character, so `a b` is sent as it is.
#[tokio::test(start_paused = true)]
async fn s41_call_option_keys_with_control_characters_go_as_their_digest() {
    check_keys(&[
        (
            "a\u{7f}b",
            "sturdy-sha256-4ef992561c6efb5dd9dc8e156a4bf8d702ebceb36dbb86d7223c4438ad6db9fa",
        ),
        (
            "\u{0}",
            "sturdy-sha256-6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        ),
        (
            "ab\u{1b}c",
            "sturdy-sha256-31ceb8dee6c96e048e0254ddda9909089b6378068151f9ba55ae4c277b8ffa8a",
        ),
        (
            "k\t",
            "sturdy-sha256-c4ddc3b8cafe254638e62b203b853bdc15f86a1455a35012fbb6306dc21205e9",
        ),
        ("a b", "a b"),
    ])
    .await;
}

/// Same sentence: a tab is a control character (U+0009), so a key holding one inside (`a\tb`)
/// "holds control characters" and goes as its digest. (A header can carry an inner tab, and
/// sturdy's own server layer answers such a key 400 `…/idempotency-key-invalid`.)
#[tokio::test(start_paused = true)]
async fn s41_call_option_key_with_an_inner_tab_goes_as_its_digest() {
    check_keys(&[(
        "a\tb",
        "sturdy-sha256-894891f8b78a9945b0aa07e70d5f71f10b1f1990af127de561cc0ac36024c188",
    )])
    .await;
}

async fn check_keys(cases: &[(&str, &str)]) {
    let mut wrong = Vec::new();
    for &(key, want) in cases {
        let server = Server::new(503, None, usize::MAX);
        let client = ClientBuilder::new().build(server.service());
        let mut r = Request::post("http://api.example.com/orders")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        r.extensions_mut()
            .insert(CallOptions::new().with_idempotency_key(key));
        let res = client.oneshot(r).await.unwrap();
        assert_eq!(res.status(), 503);
        let seen = server.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{key:?}: a keyed POST is retried");
        let sent: Vec<_> = seen.iter().map(|(k, _)| k.clone()).collect();
        assert!(sent.windows(2).all(|w| w[0] == w[1]), "{key:?}: {sent:?}");
        if sent[0] != vec![want.as_bytes().to_vec()] {
            wrong.push(format!(
                "{key:?} sent as {:?}, not {want:?}",
                String::from_utf8_lossy(&sent[0].concat())
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Same, for the report: "the value sent is the key a failed call reports". A POST keyed
/// `" padded "` (spaces at its ends) answered 503 with `Retry-After: 120` ends as an error whose
/// key is the digest that was sent.
#[tokio::test(start_paused = true)]
async fn s41_failed_call_reports_the_key_that_was_sent() {
    let server = Server::new(503, Some("120"), usize::MAX);
    let client = ClientBuilder::new().build(server.service());
    let mut r = Request::post("http://api.example.com/orders")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    r.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key(" padded "));
    let err = client.oneshot(r).await.unwrap_err();
    let sent = server.seen.lock().unwrap()[0].0.concat();
    let sent = String::from_utf8(sent).unwrap();
    assert!(sent.starts_with("sturdy-sha256-"), "{sent:?}");
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).expect("a sturdy error");
    assert_eq!(e.idempotency_key(), Some(sent.as_str()), "{err}");
}

/// retry.md, "When": "One longer than 60 s (`.with_max_retry_after(..)`) ... is not slept";
/// RELIABILITY.md: "a `Retry-After` the retry layer would sleep | at most `max_retry_after` \[60
/// s\]". `Retry-After: 60` is slept (the retry comes 60 s to 72 s later); `Retry-After: 61`
/// fails at once with `RateLimited`.
#[tokio::test(start_paused = true)]
async fn s41_retry_after_of_exactly_60_s_is_slept_61_is_not() {
    let server = Server::new(503, Some("60"), 1);
    let res = RetryLayer::new()
        .layer(server.service())
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let gap = server.gap();
    assert!(gap >= secs(60) && gap <= secs(72), "{gap:?}");

    let server = Server::new(503, Some("61"), 1);
    let t0 = Instant::now();
    let err = RetryLayer::new()
        .layer(server.service())
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(server.count(), 1);
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited");
    assert_eq!(rl.retry_after(), secs(61));
}

/// retry.md, "How much": "Deadline: ... no sleep is started that would end past it"; "When":
/// "never sooner than asked, plus up to 20 %". A 503 `Retry-After: 5` under a 5.5 s deadline,
/// for many seeds: a retry (if any) is never sooner than 5 s, and never after the deadline; the
/// call is over by the deadline.
#[tokio::test(start_paused = true)]
async fn s41_retry_after_jitter_never_sleeps_past_the_deadline() {
    for seed in 0..32u64 {
        let server = Server::new(503, Some("5"), 1);
        let t0 = Instant::now();
        let out = RetryLayer::new()
            .with_deadline(Duration::from_millis(5_500))
            .with_seed(seed)
            .layer(server.service())
            .oneshot(get("http://api.example.com/x"))
            .await;
        let took = t0.elapsed();
        assert!(
            took <= Duration::from_millis(5_500),
            "seed {seed}: over after {took:?} ({} attempts, {:?})",
            server.count(),
            out.as_ref()
                .map(Response::status)
                .map_err(ToString::to_string)
        );
        if server.count() == 2 {
            let gap = server.gap();
            assert!(gap >= secs(5), "seed {seed}: retried after {gap:?}");
        }
    }
}

/// retry.md, "When": "A `Retry-After` (seconds or HTTP date) ... never sooner than asked". With
/// the wall clock at a whole second, a 503 whose `Retry-After` is the date 30 s ahead is retried
/// 30 s to 36 s later; a date 90 s ahead (longer than 60 s) fails at once with `RateLimited` of
/// 90 s. An in-flight 409 with `Retry-After: 1` is not retried sooner than 1 s.
#[tokio::test(start_paused = true)]
async fn s41_retry_after_dates_and_in_flight_409_are_never_sooner_than_asked() {
    let now = SystemTime::UNIX_EPOCH + secs(1_700_000_000);
    let clock = Arc::new(ManualClock::at(now));
    for (ahead, slept) in [(30u64, true), (90, false)] {
        let date = httpdate_fmt(now + secs(ahead));
        let server = Server::new(503, Some(&date), 1);
        let out = RetryLayer::new()
            .with_clock(clock.clone())
            .layer(server.service())
            .oneshot(get("http://api.example.com/x"))
            .await;
        if slept {
            assert_eq!(out.unwrap().status(), 200);
            let gap = server.gap();
            assert!(gap >= secs(ahead) && gap <= secs(36), "{date}: {gap:?}");
        } else {
            let err = out.unwrap_err();
            let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited");
            assert_eq!(rl.retry_after(), secs(90), "{err}");
        }
    }
    for seed in 0..8 {
        let server = Server::new(409, Some("1"), 1);
        let mut r = Request::post("http://api.example.com/x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        r.headers_mut()
            .insert("idempotency-key", "k-409".parse().unwrap());
        let res = RetryLayer::new()
            .with_seed(seed)
            .layer(server.service())
            .oneshot(r)
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let gap = server.gap();
        assert!(
            gap >= secs(1) && gap <= Duration::from_millis(1_250),
            "{gap:?}"
        );
    }
}

fn httpdate_fmt(t: SystemTime) -> String {
    // RFC 7231 IMF-fixdate, computed by hand (no date crate among the dev-dependencies).
    let s = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let days = s / 86_400;
    let rem = s % 86_400;
    let (h, m, sec) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(mo - 1) as usize];
    format!("{wd}, {d:02} {mon} {y} {h:02}:{m:02}:{sec:02} GMT")
}

/// RELIABILITY.md, "Hostile cases tried": "a request URI with `user:password@` | ... | keys and
/// messages hold host and port only". A GET to `http://alice:hunter2@api.example.com:8443/x?
/// token=s3cr3t` that gives up (a 503 asking 120 s; connections refused) says neither the password
/// nor the query, in its message or its `Debug`.
#[tokio::test(start_paused = true)]
async fn s41_errors_hold_no_userinfo_or_query() {
    let uri = "http://alice:hunter2@api.example.com:8443/x?token=s3cr3t";
    let server = Server::new(503, Some("120"), usize::MAX);
    let client = ClientBuilder::new().build(server.service());
    let err = client.oneshot(get(uri)).await.unwrap_err();
    let refused = service_fn(|_r: Request<Full<Bytes>>| async {
        Err::<Response<Full<Bytes>>, BoxError>(Box::new(sturdy::core::Error::new(
            ErrorKind::Connect,
            "connection refused",
        )))
    });
    let err2 = ClientBuilder::new()
        .build(refused)
        .oneshot(get(uri))
        .await
        .unwrap_err();
    for e in [&err, &err2] {
        let text = format!("{e} | {e:?}");
        for s in ["hunter2", "s3cr3t", "alice"] {
            assert!(!text.contains(s), "{s:?} in {text}");
        }
    }
    assert!(err.to_string().contains("api.example.com"), "{err}");
    assert_eq!(sturdy::core::classify::delivery(&*err2), Delivery::NotSent);
}

/// Drives `svc` by hand, with no runtime and a waker that does nothing: `None` when the response
/// does not come within 1,000 polls.
fn drive<S, B>(svc: &mut S, req: Request<Body>) -> Option<(StatusCode, bool, Bytes)>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let mut fut = Box::pin(svc.call(req));
    for _ in 0..1_000 {
        if let Poll::Ready(res) = fut.as_mut().poll(&mut cx) {
            let res = res.unwrap();
            let replayed = res.headers().contains_key("idempotent-replayed");
            let status = res.status();
            let mut body = Box::pin(res.into_body().collect());
            for _ in 0..1_000 {
                if let Poll::Ready(b) = body.as_mut().poll(&mut cx) {
                    return Some((status, replayed, b.unwrap().to_bytes()));
                }
            }
            panic!("the body never ended");
        }
    }
    None
}

/// idempotency.md, "Why a started handler runs to its end": "Without a tokio runtime (another
/// executor), the handler runs in the request's future, without lease renewal; a request dropped
/// there keeps its key until its lease ends." Polled by hand with no runtime at all: a request is
/// answered (no panic) and replayed; a request dropped mid-handler keeps its key (a retry gets
/// 409, the handler does not run again).
#[test]
fn s41_server_layer_without_a_tokio_runtime() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = service_fn(move |req: Request<Body>| {
        let r = r.clone();
        async move {
            let n = r.fetch_add(1, Ordering::SeqCst);
            if req.uri().path() == "/stuck" {
                std::future::pending::<()>().await;
            }
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(201)
                    .body(Body::from(format!("run {n}")))
                    .unwrap(),
            )
        }
    });
    let mut svc =
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()).layer(handler);
    let post = |path: &str| {
        Request::post(path)
            .header("idempotency-key", "k-no-rt")
            .body(Body::from("{}"))
            .unwrap()
    };
    let answer = drive;
    let first = answer(&mut svc, post("/orders")).expect("answered");
    assert_eq!(first, (StatusCode::CREATED, false, Bytes::from("run 0")));
    let again = answer(&mut svc, post("/orders")).expect("answered");
    assert_eq!(again, (StatusCode::CREATED, true, Bytes::from("run 0")));

    let post2 = |path: &str| {
        Request::post(path)
            .header("idempotency-key", "k-stuck")
            .body(Body::from("{}"))
            .unwrap()
    };
    assert!(answer(&mut svc, post2("/stuck")).is_none(), "stuck handler");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let (s, _, b) = answer(&mut svc, post2("/stuck")).expect("answered");
    assert_eq!(s, StatusCode::CONFLICT, "{}", String::from_utf8_lossy(&b));
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["type"], problem::IN_FLIGHT);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the handler ran again");
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// idempotency.md, "How it works": "the handler runs in a tokio task of its own
/// (`tokio::spawn`, inside the current `tracing` span)". An event the handler logs carries the
/// span the request was served in.
#[tokio::test(start_paused = true)]
async fn s41_handler_task_runs_inside_the_callers_span() {
    use tracing::Instrument;
    let buf = Buf::default();
    let w = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .finish();
    let _guard = crate::logs13_common::set_default(subscriber);
    let handler = service_fn(|_req: Request<Body>| async {
        tracing::info!("inside the handler");
        Ok::<_, std::convert::Infallible>(Response::new(Body::from("ok")))
    });
    let svc =
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()).layer(handler);
    let req = Request::post("/orders")
        .header("idempotency-key", "k-span")
        .body(Body::from("{}"))
        .unwrap();
    let res = svc
        .oneshot(req)
        .instrument(tracing::info_span!("request", id = 4242))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let line = out
        .lines()
        .find(|l| l.contains("inside the handler"))
        .unwrap_or_else(|| panic!("no handler event in {out:?}"));
    assert!(line.contains("request{id=4242}"), "{line}");
}
