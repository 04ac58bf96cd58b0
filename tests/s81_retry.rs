//! Round s81, an outsider's tests of retries (`sturdy-retry`, through the facade `sturdy`), in
//! the corners earlier rounds left: settings of clones (budgets, callbacks, seeds), bodies at the
//! edges of the replay rules (a limit of 0, a body that yields more than its hint, a million tiny
//! frames), `Retry-After` with no jitter and with Unicode digits, the in-flight 409 with a date
//! and with a spent budget, an open breaker's `retry_in` at the deadline's exact edge, readiness
//! failing before a retry, cancellation during an in-flight 409's wait, and the wire.
//! Timing runs on paused time against in-process services; the wire runs in real time on
//! 127.0.0.1 port 0.
#![cfg(feature = "full")]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use sturdy::core::classify::{classify_result, Outcome};
use sturdy::core::events::{Event, RetryStop};
use sturdy::core::trace::DelaySource;
use sturdy::core::{find, BoxError, CallReport, CircuitOpen, Delivery, Error as SturdyError};
use sturdy::core::{RateLimited, WallClock};
use sturdy::retry::{Backoff, RetryLayer};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A seeded random source (splitmix64): `rand` is not a dependency of the root package.
struct Rng(u64);

impl Rng {
    fn seed_from_u64(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn at(unix: u64) -> SystemTime {
    UNIX_EPOCH + secs(unix)
}

/// The retry layer's final error, as a `sturdy::core::Error`.
fn sturdy_err(err: &BoxError) -> &SturdyError {
    err.downcast_ref::<SturdyError>()
        .unwrap_or_else(|| panic!("not a sturdy error: {err:?}"))
}

/// Every message of an error's `source()` chain, joined.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(" <- ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

/// A wall clock stuck at one time.
#[derive(Debug)]
struct Fixed(SystemTime);

impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

// ===== an in-process API that records every attempt =====

#[derive(Clone, Debug)]
struct Seen {
    when: Instant,
    body: Bytes,
    key: Option<HeaderValue>,
}

type Script = Arc<dyn Fn(usize, &str) -> Response<Full<Bytes>> + Send + Sync>;

/// An API that answers attempt `n` (0-based, over all paths) to `path` with `script(n, path)`,
/// after reading the whole body.
#[derive(Clone)]
struct Api {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Script,
}

impl Api {
    fn new(script: impl Fn(usize, &str) -> Response<Full<Bytes>> + Send + Sync + 'static) -> Self {
        Self {
            seen: Arc::new(Mutex::new(Vec::new())),
            script: Arc::new(script),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn times(&self) -> Vec<Instant> {
        self.seen().into_iter().map(|s| s.when).collect()
    }

    fn gaps(&self) -> Vec<Duration> {
        self.times().windows(2).map(|w| w[1] - w[0]).collect()
    }
}

impl<B> Service<Request<B>> for Api
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let seen = self.seen.clone();
        let script = self.script.clone();
        let when = Instant::now();
        let path = req.uri().path().to_string();
        let key = req.headers().get("idempotency-key").cloned();
        Box::pin(async move {
            let body = match req.into_body().collect().await {
                Ok(c) => c.to_bytes(),
                Err(_) => Bytes::new(),
            };
            let n = {
                let mut g = seen.lock().unwrap();
                g.push(Seen { when, body, key });
                g.len() - 1
            };
            Ok(script(n, &path))
        })
    }
}

fn resp(status: u16, retry_after: Option<&[u8]>) -> Response<Full<Bytes>> {
    let mut r = Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .unwrap();
    if let Some(v) = retry_after {
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_bytes(v).unwrap());
    }
    r
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::new(Bytes::new())).unwrap()
}

fn post_keyed(url: &str, key: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// What the layer's `on_event` callback saw.
#[derive(Clone, Debug, PartialEq)]
enum Ev {
    Scheduled {
        attempt: u32,
        delay: Duration,
        source: DelaySource,
    },
    Stopped {
        attempt: u32,
        stop: RetryStop,
    },
}

type Log = Arc<Mutex<Vec<Ev>>>;

fn recorder() -> (Log, impl Fn(&Event<'_>) + Send + Sync + 'static) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let f = move |e: &Event<'_>| match e {
        Event::RetryScheduled {
            attempt,
            delay,
            source,
            ..
        } => l.lock().unwrap().push(Ev::Scheduled {
            attempt: *attempt,
            delay: *delay,
            source: *source,
        }),
        Event::RetryStopped { attempt, stop, .. } => l.lock().unwrap().push(Ev::Stopped {
            attempt: *attempt,
            stop: *stop,
        }),
        _ => {}
    };
    (log, f)
}

fn logged(log: &Log) -> Vec<Ev> {
    log.lock().unwrap().clone()
}

/// A body that yields the frames it was given, with the size hint it was given.
struct Chunks {
    frames: VecDeque<Bytes>,
    hint: SizeHint,
}

impl Chunks {
    fn new(frames: Vec<Bytes>, hint: SizeHint) -> Self {
        Self {
            frames: frames.into(),
            hint,
        }
    }
}

impl From<Bytes> for Chunks {
    fn from(b: Bytes) -> Self {
        let hint = SizeHint::with_exact(b.len() as u64);
        Self::new(vec![b], hint)
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.frames.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

fn hint(lower: u64, upper: Option<u64>) -> SizeHint {
    let mut h = SizeHint::new();
    h.set_lower(lower);
    if let Some(u) = upper {
        h.set_upper(u);
    }
    h
}

fn fast() -> Backoff {
    Backoff::exponential(ms(1), ms(1)).unwrap()
}

// ===== settings of clones =====

/// ARCHITECTURE.md: "a retry layer's clones share its per-host budgets until `with_budget` gives
/// one of them its own". A clone given other settings (attempts, a backoff, a classifier, a
/// callback) still spends the same budget; a clone given `with_budget` has its own, and one
/// given `without_budget` has none.
#[tokio::test(start_paused = true)]
async fn s81_clones_share_budgets_until_with_budget_gives_one_its_own() {
    let a = RetryLayer::new()
        .with_backoff(fast())
        .with_max_attempts(1000)
        .with_budget(secs(10), 1, 0.0)
        .unwrap();
    let b = a.clone().with_max_attempts(500).with_backoff(fast());
    let c = a.clone().on_event(|_| {}).with_classifier(
        |r: &Result<Response<Full<Bytes>>, BoxError>| -> Outcome { classify_result(r) },
    );
    let d = a.clone().with_budget(secs(10), 1, 0.0).unwrap();
    let e = a.clone().without_budget().with_max_attempts(20);
    let url = "http://api.example.com/x";
    let run = |svc: tower::util::BoxService<
        Request<Full<Bytes>>,
        Response<Full<Bytes>>,
        BoxError,
    >| async move {
        tokio::time::timeout(secs(60), svc.oneshot(get(url)))
            .await
            .expect("bounded")
            .unwrap()
    };
    let count = |api: &Api| api.count();

    let api_a = Api::new(|_, _| resp(503, None));
    let res = run(tower::util::BoxService::new(a.layer(api_a.clone()))).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let first = count(&api_a);
    assert!(first > 1, "the reserve of 10 allows retries: {first}");
    assert!(
        first <= 11,
        "a reserve of 1/s over 10 s is 10 retries: {first}"
    );

    let api_b = Api::new(|_, _| resp(503, None));
    run(tower::util::BoxService::new(b.layer(api_b.clone()))).await;
    assert_eq!(
        count(&api_b),
        1,
        "a clone with other attempts spends the same budget"
    );

    let api_c = Api::new(|_, _| resp(503, None));
    run(tower::util::BoxService::new(c.layer(api_c.clone()))).await;
    assert_eq!(
        count(&api_c),
        1,
        "a clone with a classifier spends the same budget"
    );

    let api_d = Api::new(|_, _| resp(503, None));
    run(tower::util::BoxService::new(d.layer(api_d.clone()))).await;
    assert_eq!(
        count(&api_d),
        first,
        "with_budget gives the clone its own budget"
    );

    let api_e = Api::new(|_, _| resp(503, None));
    run(tower::util::BoxService::new(e.layer(api_e.clone()))).await;
    assert_eq!(
        count(&api_e),
        20,
        "without_budget: only the attempts bound retries"
    );

    // The original is still spent, and the one with its own budget too now.
    let api_a2 = Api::new(|_, _| resp(503, None));
    run(tower::util::BoxService::new(a.layer(api_a2.clone()))).await;
    assert_eq!(count(&api_a2), 1);
}

/// `on_event`: "replaces an earlier callback"; and a layer's settings are plain values, so a
/// clone's new callback leaves the original's in place.
#[tokio::test(start_paused = true)]
async fn s81_on_event_replaces_an_earlier_callback_and_a_clones_is_its_own() {
    let first = Arc::new(AtomicUsize::new(0));
    let second = Arc::new(AtomicUsize::new(0));
    let third = Arc::new(AtomicUsize::new(0));
    let (f1, f2, f3) = (first.clone(), second.clone(), third.clone());
    let layer = RetryLayer::new()
        .with_seed(3)
        .on_event(move |_| {
            f1.fetch_add(1, Ordering::SeqCst);
        })
        .on_event(move |_| {
            f2.fetch_add(1, Ordering::SeqCst);
        });
    let clone = layer.clone().on_event(move |_| {
        f3.fetch_add(1, Ordering::SeqCst);
    });
    let api = Api::new(|_, _| resp(503, None));
    let res = tokio::time::timeout(
        secs(120),
        layer
            .layer(api.clone())
            .oneshot(get("http://api.example.com/")),
    )
    .await
    .expect("bounded")
    .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.count(), 4);
    assert_eq!(first.load(Ordering::SeqCst), 0, "the replaced callback");
    assert_eq!(second.load(Ordering::SeqCst), 4, "3 scheduled + 1 stopped");
    assert_eq!(third.load(Ordering::SeqCst), 0, "the clone's callback");

    let api = Api::new(|_, _| resp(503, None));
    tokio::time::timeout(
        secs(120),
        clone
            .layer(api.clone())
            .oneshot(get("http://api.example.com/")),
    )
    .await
    .expect("bounded")
    .unwrap();
    assert_eq!(second.load(Ordering::SeqCst), 4);
    assert_eq!(third.load(Ordering::SeqCst), 4);
}

/// `with_seed`: "Call `n` of the layer uses seed `seed + f(n)`". Two services made from one
/// layer make calls of that layer: the sleeps of its call 0 and call 1 are those of one service
/// of a layer with the same seed, whichever service made the call.
#[tokio::test(start_paused = true)]
async fn s81_a_seed_counts_the_calls_of_the_layer_across_its_services() {
    // Each call: a 503, then 200.
    let script = |n: usize, _: &str| {
        if n.is_multiple_of(2) {
            resp(503, None)
        } else {
            resp(200, None)
        }
    };
    async fn call<S>(svc: S)
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>,
    {
        let res = tokio::time::timeout(secs(60), svc.oneshot(get("http://api.example.com/")))
            .await
            .expect("bounded")
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    // Reference: two calls through one service of a layer seeded 42.
    let reference = Api::new(script);
    let svc = RetryLayer::new().with_seed(42).layer(reference.clone());
    call(svc.clone()).await;
    call(svc).await;
    let t = reference.times();
    let (h0, h1) = (t[1] - t[0], t[3] - t[2]);
    assert_ne!(h0, h1, "two calls of one layer sleep alike: lock-step");

    // One call through each of two services of another layer seeded 42.
    let layer = RetryLayer::new().with_seed(42);
    let a1 = Api::new(script);
    let a2 = Api::new(script);
    call(layer.layer(a1.clone())).await;
    call(layer.layer(a2.clone())).await;
    assert_eq!(a1.gaps()[0], h0, "call 0 of a layer seeded 42");
    assert_eq!(
        a2.gaps()[0],
        h1,
        "call 1 of the layer (from its second service); call 0 slept {h0:?}"
    );
}

// ===== bodies at the edges of the replay rules =====

/// `with_body_limit(bytes)`: "A body whose size hint does not prove it fits (a larger or
/// unbounded stream) is sent once and never retried." At a limit of 0, an empty body (exact
/// size 0) fits and is replayed; one byte does not and is sent once.
#[tokio::test(start_paused = true)]
async fn s81_a_body_limit_of_zero_keeps_an_empty_body_and_sends_one_byte_once() {
    let script = |n: usize, _: &str| {
        if n == 0 {
            resp(503, None)
        } else {
            resp(200, None)
        }
    };
    let layer = RetryLayer::new().with_seed(1).with_body_limit(0);
    let api = Api::new(script);
    let res = tokio::time::timeout(
        secs(30),
        layer.layer(api.clone()).oneshot(
            Request::put("http://api.example.com/e")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .expect("bounded")
    .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "the empty body fits a limit of 0"
    );
    assert_eq!(api.count(), 2);

    let api = Api::new(script);
    let res = tokio::time::timeout(
        secs(30),
        layer.layer(api.clone()).oneshot(
            Request::put("http://api.example.com/one")
                .body(Full::new(Bytes::from_static(b"x")))
                .unwrap(),
        ),
    )
    .await
    .expect("bounded")
    .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.count(), 1, "one byte over a limit of 0 is sent once");
    assert_eq!(api.seen()[0].body, Bytes::from_static(b"x"));
}

/// RELIABILITY.md: "one whose size hint said it fits but which yields more is refused (not
/// sent) once the limit has arrived". A body whose exact hint says 5 bytes and which yields 7,
/// far below the 1 MiB limit, has not reached the limit: whatever is sent, each attempt sends
/// the same bytes, the 7 the body yielded, never a cut copy.
#[tokio::test(start_paused = true)]
async fn s81_a_body_yielding_more_than_its_hint_within_the_limit_is_never_cut() {
    let api = Api::new(|n, _| {
        if n == 0 {
            resp(503, None)
        } else {
            resp(200, None)
        }
    });
    let body = Chunks::new(
        vec![Bytes::from_static(b"abc"), Bytes::from_static(b"defg")],
        SizeHint::with_exact(5),
    );
    let req = Request::put("http://api.example.com/lie")
        .body(body)
        .unwrap();
    let out = tokio::time::timeout(
        secs(30),
        RetryLayer::new()
            .with_seed(2)
            .layer(api.clone())
            .oneshot(req),
    )
    .await
    .expect("bounded");
    for s in api.seen() {
        assert_eq!(
            s.body,
            Bytes::from_static(b"abcdefg"),
            "an attempt's body was cut"
        );
    }
    match out {
        Ok(res) => {
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(api.count(), 2);
        }
        Err(e) => panic!(
            "refused before the limit arrived ({} attempts): {}",
            api.count(),
            chain(&*e)
        ),
    }
}

/// The crate docs: "an upper bound within the limit is kept for a replay too" (0afa820): a body
/// whose hint is `0..=10` and that yields 10 bytes in three frames is replayed byte for byte;
/// one that yields nothing at all under the same hint is replayed empty.
#[tokio::test(start_paused = true)]
async fn s81_a_body_with_an_upper_bound_within_the_limit_is_replayed_byte_for_byte() {
    for frames in [
        vec![
            Bytes::from_static(b"01234"),
            Bytes::from_static(b"5"),
            Bytes::from_static(b"6789"),
        ],
        vec![],
    ] {
        let whole: Vec<u8> = frames.iter().flat_map(|b| b.to_vec()).collect();
        let api = Api::new(|n, _| {
            if n < 2 {
                resp(503, None)
            } else {
                resp(200, None)
            }
        });
        let req = Request::put("http://api.example.com/bounded")
            .body(Chunks::new(frames, hint(0, Some(10))))
            .unwrap();
        let res = tokio::time::timeout(
            secs(30),
            RetryLayer::new()
                .with_seed(4)
                .layer(api.clone())
                .oneshot(req),
        )
        .await
        .expect("bounded")
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let seen = api.seen();
        assert_eq!(seen.len(), 3);
        for s in seen {
            assert_eq!(&s.body[..], &whole[..]);
        }
    }
}

/// A body of 512 Ki one-byte frames (half the limit) is kept and replayed: the cost of keeping
/// it must be linear in its frames, not quadratic (a copy of all so far per frame would be
/// 137 GB of copying).
#[tokio::test]
async fn s81_half_a_mebibyte_of_one_byte_frames_is_kept_in_linear_time() {
    const N: usize = 512 * 1024;
    let frames: Vec<Bytes> = (0..N).map(|i| Bytes::from(vec![(i % 251) as u8])).collect();
    let want: Vec<u8> = (0..N).map(|i| (i % 251) as u8).collect();
    let api = Api::new(|n, _| {
        if n == 0 {
            resp(503, None)
        } else {
            resp(200, None)
        }
    });
    let req = Request::put("http://api.example.com/tiny")
        .body(Chunks::new(frames, SizeHint::with_exact(N as u64)))
        .unwrap();
    let started = Instant::now();
    let res = tokio::time::timeout(
        secs(30),
        RetryLayer::new()
            .with_seed(5)
            .with_backoff(fast())
            .layer(api.clone())
            .oneshot(req),
    )
    .await
    .expect("bounded")
    .unwrap();
    let took = started.elapsed();
    assert_eq!(res.status(), StatusCode::OK);
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    for s in seen {
        assert!(s.body[..] == want[..], "the replayed body differs");
    }
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

/// retry.md: a call "not retried (a POST without a key, a body not kept for a replay, ...)" on a
/// 429 or a 503 with `Retry-After` "fails at once with a `RateLimited { retry_after }` in its
/// error chain". A keyed POST whose streamed body has no upper bound, answered 429 `Retry-After: 2`:
/// one attempt, `RateLimited` of 2 s, and the stop named `NotReplayable`.
#[tokio::test(start_paused = true)]
async fn s81_an_unbounded_body_answered_429_with_retry_after_ends_rate_limited() {
    let api = Api::new(|_, _| resp(429, Some(b"2")));
    let (log, f) = recorder();
    let req = Request::post("http://api.example.com/stream")
        .header("idempotency-key", "k-stream-1")
        .body(Chunks::new(
            vec![Bytes::from_static(b"part1"), Bytes::from_static(b"part2")],
            hint(0, None),
        ))
        .unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(
        secs(30),
        RetryLayer::new()
            .with_seed(6)
            .on_event(f)
            .layer(api.clone())
            .oneshot(req),
    )
    .await
    .expect("bounded")
    .unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO, "not slept");
    assert_eq!(api.count(), 1);
    assert_eq!(api.seen()[0].body, Bytes::from_static(b"part1part2"));
    let rl = find::<RateLimited>(&*err).unwrap_or_else(|| panic!("no RateLimited: {err}"));
    assert_eq!(rl.retry_after(), secs(2));
    let e = sturdy_err(&err);
    let report = e.report().expect("a report");
    assert_eq!(report.attempts(), 1);
    assert_eq!(report.delivery(), Delivery::MaybeProcessed);
    assert_eq!(report.idempotency_key(), Some("k-stream-1"));
    assert_eq!(
        logged(&log),
        vec![Ev::Stopped {
            attempt: 1,
            stop: RetryStop::NotReplayable
        }]
    );
}

// ===== Retry-After =====

/// `with_retry_after_jitter(fraction)`: "Extra random wait added to a `Retry-After`, as a
/// fraction of it \[0.2\]; clamped to 0..=1". At 0 the wait is exactly what the server asked:
/// `Retry-After: 2` is slept 2 s (never sooner), `Retry-After: 0` not at all.
#[tokio::test(start_paused = true)]
async fn s81_no_retry_after_jitter_sleeps_exactly_the_wait() {
    let api = Api::new(|n, _| match n {
        0 => resp(503, Some(b"2")),
        1 => resp(429, Some(b"0")),
        2 => resp(503, Some(b"1")),
        _ => resp(200, None),
    });
    let (log, f) = recorder();
    let svc = RetryLayer::new()
        .with_seed(8)
        .with_retry_after_jitter(0.0)
        .on_event(f)
        .layer(api.clone());
    let res = tokio::time::timeout(secs(30), svc.oneshot(get("http://api.example.com/")))
        .await
        .expect("bounded")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let g = api.gaps();
    assert_eq!(g.len(), 3);
    assert!(g[0] >= secs(2) && g[0] <= secs(2) + ms(1), "{g:?}");
    assert!(g[1] <= ms(1), "{g:?}");
    assert!(g[2] >= secs(1) && g[2] <= secs(1) + ms(1), "{g:?}");
    let log = logged(&log);
    let delays: Vec<Duration> = log
        .iter()
        .map(|e| match e {
            Ev::Scheduled { delay, source, .. } => {
                assert_eq!(*source, DelaySource::RetryAfter);
                *delay
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(delays, vec![secs(2), Duration::ZERO, secs(1)]);
}

/// `Event::RetryScheduled::delay`: "How long the layer waits before the next attempt", its
/// `source` "the server's `Retry-After`": for a jittered wait and for a date already past (no
/// wait at all, plus up to 20 % of the 250 ms base), the delay reported is the gap slept.
#[tokio::test(start_paused = true)]
async fn s81_the_event_delay_of_a_retry_after_is_the_gap_slept() {
    let now = 1_800_000_000;
    let past = httpdate_of(now - 3600);
    let ahead = httpdate_of(now + 7);
    let api = Api::new(move |n, _| match n {
        0 => resp(503, Some(b"3")),
        1 => resp(503, Some(past.as_bytes())),
        2 => resp(429, Some(ahead.as_bytes())),
        _ => resp(200, None),
    });
    let (log, f) = recorder();
    let svc = RetryLayer::new()
        .with_seed(9)
        .with_clock(Arc::new(Fixed(at(now))))
        .on_event(f)
        .layer(api.clone());
    let res = tokio::time::timeout(secs(60), svc.oneshot(get("http://api.example.com/")))
        .await
        .expect("bounded")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let g = api.gaps();
    let log = logged(&log);
    assert_eq!(log.len(), 3, "{log:?}");
    let (lo, hi) = [
        (secs(3), ms(3600)),
        (Duration::ZERO, ms(50)),
        (secs(7), ms(8400)),
    ]
    .into_iter()
    .unzip::<_, _, Vec<_>, Vec<_>>();
    for (i, e) in log.iter().enumerate() {
        match e {
            Ev::Scheduled {
                attempt,
                delay,
                source,
            } => {
                assert_eq!(*attempt as usize, i + 1);
                assert_eq!(*source, DelaySource::RetryAfter, "retry {i}");
                assert!(*delay >= lo[i] && *delay <= hi[i], "retry {i}: {delay:?}");
                assert!(
                    g[i] >= *delay && g[i] <= *delay + ms(1),
                    "retry {i}: {delay:?} vs {:?}",
                    g[i]
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

/// An IMF-fixdate for a Unix time (the proleptic Gregorian calendar, days from 1970).
fn httpdate_of(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix / 86_400;
    let rem = unix % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
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
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(mo - 1) as usize],
        y,
        h,
        m,
        s
    )
}

#[test]
fn s81_httpdate_helper_matches_the_rfc_example() {
    assert_eq!(httpdate_of(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    let t =
        sturdy::core::headers::parse_http_date(httpdate_of(1_800_000_007).as_bytes(), "x").unwrap();
    assert_eq!(t, at(1_800_000_007));
}

/// delay-seconds is `1*DIGIT` (ASCII digits, STANDARDS.md §6; urllib3 refuses the superscript
/// `²`). Digits of other scripts, a no-break space, hex, exponents and units are not a delay:
/// the retry follows the backoff's first draw (250 to 750 ms), never a wait read from them (a
/// `٣٠٠٠٠٠` read as 300,000 s would end the call as `RateLimited`).
#[tokio::test(start_paused = true)]
async fn s81_retry_after_in_other_digits_or_forms_falls_back_to_the_backoff() {
    let values: Vec<&[u8]> = vec![
        "\u{ff11}\u{ff10}".as_bytes(),                           // fullwidth 10
        "\u{663}\u{660}\u{660}\u{660}\u{660}\u{660}".as_bytes(), // Arabic-Indic 300000
        "\u{b2}".as_bytes(),
        "\u{a0}5".as_bytes(),
        "5\u{a0}".as_bytes(),
        "\u{2009}5".as_bytes(),
        b"0x10",
        b"1e3",
        b"5s",
        b"1_0",
        b"5 5",
        b"\"5\"",
        b"5;q=1",
        b"\xff\xfe",
        b"Sun, 06 Nov \xef\xbc\x99999 08:49:37 GMT",
    ];
    for (i, v) in values.into_iter().enumerate() {
        let value = v.to_vec();
        let api = Api::new(move |n, _| {
            if n == 0 {
                resp(503, Some(&value))
            } else {
                resp(200, None)
            }
        });
        let svc = RetryLayer::new().with_seed(i as u64).layer(api.clone());
        let out = tokio::time::timeout(secs(60), svc.oneshot(get("http://api.example.com/")))
            .await
            .expect("bounded");
        let res =
            out.unwrap_or_else(|e| panic!("{:?}: {}", String::from_utf8_lossy(v), chain(&*e)));
        assert_eq!(
            res.status(),
            StatusCode::OK,
            "{:?}",
            String::from_utf8_lossy(v)
        );
        let g = api.gaps()[0];
        assert!(
            g >= ms(250) && g <= ms(751),
            "{:?} slept {g:?}",
            String::from_utf8_lossy(v)
        );
    }
}

/// `MAX_REPORTED_WAIT`: "The longest wait a `RateLimited` error from this layer reports when a
/// server asked for more than the client sleeps: 5 minutes ... A longer `max_retry_after`
/// raises it to that setting." At the edges: 300 s is reported as 300 s, 301 s as 300 s; with
/// `max_retry_after` of 120 s a 299 s wait is the server's; with 400 s, 1000 s is 400 s.
#[tokio::test(start_paused = true)]
async fn s81_the_reported_wait_at_the_edges_of_its_cap() {
    assert_eq!(sturdy::retry::MAX_REPORTED_WAIT, secs(300));
    for (max, asked, want) in [
        (None, &b"300"[..], secs(300)),
        (None, b"301", secs(300)),
        (None, b"61", secs(61)),
        (Some(secs(120)), b"299", secs(299)),
        (Some(secs(120)), b"121", secs(121)),
        (Some(secs(400)), b"1000", secs(400)),
        (Some(secs(400)), b"401", secs(400)),
    ] {
        let value = asked.to_vec();
        let api = Api::new(move |_, _| resp(503, Some(&value)));
        let mut layer = RetryLayer::new().with_seed(10);
        if let Some(m) = max {
            layer = layer.with_max_retry_after(m);
        }
        let started = Instant::now();
        let out = tokio::time::timeout(
            secs(3600),
            layer
                .layer(api.clone())
                .oneshot(get("http://api.example.com/")),
        )
        .await
        .expect("bounded");
        let label = String::from_utf8_lossy(asked);
        let err = out.expect_err(&label);
        assert_eq!(started.elapsed(), Duration::ZERO, "{label}: not slept");
        assert_eq!(api.count(), 1, "{label}");
        let rl = find::<RateLimited>(&*err).unwrap_or_else(|| panic!("{label}: {err}"));
        assert_eq!(rl.retry_after(), want, "{label} with max {max:?}");
    }
}

// ===== the in-flight 409 =====

/// retry.md: "A 409 that answers a request with an `Idempotency-Key` *and* carries
/// `Retry-After` ... is retried after the `Retry-After`"; "A `Retry-After` (seconds or HTTP
/// date) on a 429, a 503 or an in-flight 409 overrides the backoff: never sooner than asked,
/// plus up to 20 %". An HTTP date 2 s ahead of the layer's clock is waited 2 to 2.4 s.
#[tokio::test(start_paused = true)]
async fn s81_an_in_flight_409_with_a_date_is_waited_until_that_date() {
    let now = 1_800_000_000;
    let ahead = httpdate_of(now + 2);
    let api = Api::new(move |n, _| {
        if n == 0 {
            resp(409, Some(ahead.as_bytes()))
        } else {
            resp(201, None)
        }
    });
    let (log, f) = recorder();
    let svc = RetryLayer::new()
        .with_seed(11)
        .with_clock(Arc::new(Fixed(at(now))))
        .on_event(f)
        .layer(api.clone());
    let res = tokio::time::timeout(
        secs(30),
        svc.oneshot(post_keyed(
            "http://api.example.com/orders",
            "k-409-date",
            "{}",
        )),
    )
    .await
    .expect("bounded")
    .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let g = api.gaps();
    assert!(g[0] >= secs(2) && g[0] <= ms(2400), "{g:?}");
    let seen = api.seen();
    assert_eq!(seen[1].key, Some(HeaderValue::from_static("k-409-date")));
    assert_eq!(seen[1].body, Bytes::from_static(b"{}"));
    match &logged(&log)[0] {
        Ev::Scheduled { source, .. } => assert_eq!(*source, DelaySource::RetryAfter),
        other => panic!("{other:?}"),
    }
}

/// retry.md: a `Retry-After` "on a call that is not retried (..., a spent retry budget) is not
/// slept: ... a 409 is returned as it is (the server's answer, with a `CallReport` in its
/// extensions)". A keyed POST answered by an in-flight 409 when the host's budget allows no
/// retry at all.
#[tokio::test(start_paused = true)]
async fn s81_an_in_flight_409_with_a_spent_budget_is_returned_with_its_report() {
    let api = Api::new(|_, _| resp(409, Some(b"1")));
    let (log, f) = recorder();
    let svc = RetryLayer::new()
        .with_seed(12)
        .with_budget(secs(1), 0, 0.0)
        .unwrap()
        .on_event(f)
        .layer(api.clone());
    let started = Instant::now();
    let res = tokio::time::timeout(
        secs(30),
        svc.oneshot(post_keyed(
            "http://api.example.com/orders",
            "k-409-spent",
            "{}",
        )),
    )
    .await
    .expect("bounded")
    .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(api.count(), 1);
    let report = res
        .extensions()
        .get::<CallReport>()
        .expect("a CallReport in the 409's extensions");
    assert_eq!(report.attempts(), 1);
    assert_eq!(report.delivery(), Delivery::MaybeProcessed);
    assert_eq!(report.idempotency_key(), Some("k-409-spent"));
    assert_eq!(
        logged(&log),
        vec![Ev::Stopped {
            attempt: 1,
            stop: RetryStop::BudgetExhausted
        }]
    );
}

/// ARCHITECTURE.md's readiness contract and retry.md "Where it may sit": a call waiting out an
/// in-flight 409 under `ConcurrencyLimit(1)` holds no permit (another call goes through
/// meanwhile), and a call dropped at a seeded point of that wait sends nothing more and leaves
/// the limit free.
#[tokio::test(start_paused = true)]
async fn s81_an_in_flight_409_wait_holds_no_permit_and_a_drop_sends_nothing_more() {
    let mut rng = Rng::seed_from_u64(81);
    for round in 0..12 {
        // /slow: an in-flight 409 asking 5 s on every attempt; /fast: 200.
        let api = Api::new(|_, path| {
            if path == "/slow" {
                resp(409, Some(b"5"))
            } else {
                resp(200, None)
            }
        });
        let svc = RetryLayer::new()
            .with_seed(round)
            .layer(tower::limit::ConcurrencyLimit::new(api.clone(), 1));
        let mut kept = svc.clone();
        let slow = tokio::spawn({
            let svc = svc.clone();
            async move {
                svc.oneshot(post_keyed("http://api.example.com/slow", "k-slow", "x"))
                    .await
            }
        });
        tokio::time::sleep(ms(1)).await;
        assert_eq!(api.count(), 1, "round {round}: the first /slow attempt");
        // Another call through a kept service goes through during the wait.
        let fast = tokio::time::timeout(ms(500), async {
            ServiceExt::<Request<Full<Bytes>>>::ready(&mut kept)
                .await
                .unwrap()
                .call(get("http://api.example.com/fast"))
                .await
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: the wait of an in-flight 409 holds the permit"))
        .unwrap();
        assert_eq!(fast.status(), StatusCode::OK);
        // Drop the slow call at a seeded point of its wait (or its second wait).
        tokio::time::sleep(ms(rng.below(11_000))).await;
        slow.abort();
        let _ = slow.await;
        let sent = api.count();
        tokio::time::sleep(secs(30)).await;
        assert_eq!(
            api.count(),
            sent,
            "round {round}: an attempt after the drop"
        );
        // The limit is free.
        let again = tokio::time::timeout(ms(100), async {
            ServiceExt::<Request<Full<Bytes>>>::ready(&mut kept)
                .await
                .unwrap()
                .call(get("http://api.example.com/fast"))
                .await
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: the limit stayed taken after the drop"))
        .unwrap();
        assert_eq!(again.status(), StatusCode::OK);
    }
}

// ===== an open breaker's retry_in at the deadline's edge =====

/// An inner service that first refuses `refusals` times with `open`, then answers 200.
#[derive(Clone)]
struct Breaker {
    open: CircuitOpen,
    refusals: usize,
    calls: Arc<Mutex<Vec<Instant>>>,
}

impl Service<Request<Full<Bytes>>> for Breaker {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        let n = {
            let mut g = self.calls.lock().unwrap();
            g.push(Instant::now());
            g.len()
        };
        let open = self.open.clone();
        let refusals = self.refusals;
        Box::pin(async move {
            if n <= refusals {
                Err(open.into())
            } else {
                Ok(resp(200, None))
            }
        })
    }
}

/// retry.md: "An open circuit breaker below (`CircuitOpen { retry_in }`) is waited out only when
/// the call has a deadline and `retry_in` ends before it". With a 10 s deadline: a `retry_in`
/// of 9.999 s is waited out; 10 s (ending at the deadline, not before it) and 11 s fail at once,
/// not sent, with the `CircuitOpen` in the chain.
#[tokio::test(start_paused = true)]
async fn s81_an_open_breakers_retry_in_at_the_deadlines_edge() {
    for (retry_in, waited) in [(ms(9_999), true), (secs(10), false), (secs(11), false)] {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let inner = Breaker {
            open: CircuitOpen::new("api.example.com", retry_in),
            refusals: 1,
            calls: calls.clone(),
        };
        let svc = RetryLayer::new()
            .with_seed(13)
            .with_deadline(secs(10))
            .layer(inner);
        let started = Instant::now();
        let out = tokio::time::timeout(
            secs(60),
            svc.oneshot(
                Request::post("http://api.example.com/orders")
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap(),
            ),
        )
        .await
        .expect("bounded");
        let n = calls.lock().unwrap().len();
        if waited {
            let res = out.unwrap_or_else(|e| panic!("{retry_in:?}: {}", chain(&*e)));
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(n, 2);
            assert!(started.elapsed() >= retry_in, "{:?}", started.elapsed());
        } else {
            let err = match out {
                Ok(res) => panic!("{retry_in:?}: waited and answered {}", res.status()),
                Err(e) => e,
            };
            assert_eq!(
                started.elapsed(),
                Duration::ZERO,
                "{retry_in:?}: {}",
                chain(&*err)
            );
            assert_eq!(n, 1, "{retry_in:?}");
            let open = find::<CircuitOpen>(&*err).unwrap_or_else(|| panic!("{err}"));
            assert_eq!(open.retry_in(), retry_in);
            assert_eq!(
                sturdy::core::classify::delivery(&*err),
                Delivery::NotSent,
                "{retry_in:?}: {err}"
            );
        }
    }
}

// ===== readiness failing before a retry =====

/// An inner service whose readiness fails from its `fail_from`th poll on.
#[derive(Clone)]
struct Closing {
    polls: Arc<AtomicUsize>,
    fail_from: usize,
    calls: Arc<AtomicUsize>,
}

impl Service<Request<Full<Bytes>>> for Closing {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let n = self.polls.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.fail_from {
            Poll::Ready(Err("the connection pool was closed".into()))
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(resp(503, None)))
    }
}

/// retry.md "What the caller gets": "A final *error* is one `sturdy_core::Error` that speaks for
/// the whole call (two exceptions: an error of the inner service's `poll_ready` *before the
/// call*, which is returned as it is, and a request body that could not be read ...)". A
/// readiness error *before a retry*, after a keyed POST was answered 503, is not before the
/// call: the error speaks for the call, with a report of the one attempt that may have been
/// processed and its key.
#[tokio::test(start_paused = true)]
async fn s81_a_readiness_error_before_a_retry_speaks_for_the_call() {
    let polls = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = Closing {
        polls: polls.clone(),
        fail_from: 2,
        calls: calls.clone(),
    };
    let svc = RetryLayer::new().with_seed(14).layer(inner);
    let err = tokio::time::timeout(
        secs(30),
        svc.oneshot(post_keyed(
            "http://api.example.com/orders",
            "k-closing",
            "{}",
        )),
    )
    .await
    .expect("bounded")
    .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        chain(&*err).contains("the connection pool was closed"),
        "the cause is named: {}",
        chain(&*err)
    );
    let e = err
        .downcast_ref::<SturdyError>()
        .unwrap_or_else(|| panic!("returned as it is, with no report: {}", chain(&*err)));
    let report = e.report().expect("a report");
    assert_eq!(report.attempts(), 1);
    assert_eq!(report.delivery(), Delivery::MaybeProcessed);
    assert_eq!(report.idempotency_key(), Some("k-closing"));
    assert!(e.to_string().contains("k-closing"), "{e}");
}

/// The other side: an error of `poll_ready` before the call is returned as it is.
#[tokio::test(start_paused = true)]
async fn s81_a_readiness_error_before_the_call_is_returned_as_it_is() {
    let inner = Closing {
        polls: Arc::new(AtomicUsize::new(0)),
        fail_from: 1,
        calls: Arc::new(AtomicUsize::new(0)),
    };
    let mut svc = RetryLayer::new().with_seed(15).layer(inner);
    let err = futures_util::future::poll_fn(|cx| svc.poll_ready(cx))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "the connection pool was closed");
}

// ===== backoff edges =====

/// `Backoff::decorrelated_jitter`: an error "When `base` is zero or larger than `cap`"; equal
/// is valid, and every sleep is then exactly that one value, through the layer too.
#[tokio::test(start_paused = true)]
async fn s81_decorrelated_jitter_with_base_equal_to_cap_sleeps_exactly_that() {
    let b = Backoff::decorrelated_jitter(secs(1), secs(1)).unwrap();
    let mut rng = Rng::seed_from_u64(16);
    let mut prev = None;
    for retry in 1..50u32 {
        let d = b.delay(retry, prev, rng.next_u64());
        assert_eq!(d, secs(1));
        prev = Some(d);
    }
    assert_eq!(b.delay(u32::MAX, Some(Duration::MAX), u64::MAX), secs(1));
    assert_eq!(b.delay(1, Some(Duration::ZERO), 0), secs(1));
    let api = Api::new(|_, _| resp(503, None));
    let svc = RetryLayer::new()
        .with_seed(16)
        .with_backoff(b)
        .layer(api.clone());
    tokio::time::timeout(secs(60), svc.oneshot(get("http://api.example.com/")))
        .await
        .expect("bounded")
        .unwrap();
    for g in api.gaps() {
        assert!(g >= secs(1) && g <= secs(1) + ms(1), "{g:?}");
    }
    // One nanosecond is a valid base and cap.
    let tiny = Backoff::decorrelated_jitter(Duration::from_nanos(1), Duration::from_nanos(1));
    assert_eq!(
        tiny.unwrap().delay(7, None, u64::MAX),
        Duration::from_nanos(1)
    );
    assert!(Backoff::decorrelated_jitter(Duration::ZERO, Duration::ZERO).is_err());
    assert!(Backoff::full_jitter(secs(2), secs(1)).is_err());
}

/// `Backoff::full_jitter`: "`sleep = random_between(0, min(cap, base * 2^(retry - 1)))`". Through
/// the layer, seeded: each gap is at most its ceiling, the same seed gives the same gaps, and
/// the event says `Backoff`.
#[tokio::test(start_paused = true)]
async fn s81_full_jitter_through_the_layer_stays_under_its_ceiling_and_repeats() {
    let b = Backoff::full_jitter(ms(100), ms(700)).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let api = Api::new(|_, _| resp(503, None));
        let (log, f) = recorder();
        let svc = RetryLayer::new()
            .with_seed(17)
            .with_max_attempts(8)
            .with_backoff(b)
            .on_event(f)
            .layer(api.clone());
        tokio::time::timeout(secs(60), svc.oneshot(get("http://api.example.com/")))
            .await
            .expect("bounded")
            .unwrap();
        let g = api.gaps();
        assert_eq!(g.len(), 7);
        for (i, gap) in g.iter().enumerate() {
            let ceiling = std::cmp::min(ms(700), ms(100) * 2u32.pow(i as u32));
            assert!(
                *gap <= ceiling + ms(1),
                "retry {}: {gap:?} over {ceiling:?}",
                i + 1
            );
        }
        for e in logged(&log).iter().take(7) {
            match e {
                Ev::Scheduled { source, .. } => assert_eq!(*source, DelaySource::Backoff),
                other => panic!("{other:?}"),
            }
        }
        runs.push(g);
    }
    assert_eq!(runs[0], runs[1], "the same seed, the same sleeps");
}

// ===== the wire: responses lost in ways hyper reads as errors =====

/// A raw HTTP/1 server on 127.0.0.1 port 0: for connection `n` it reads one whole request
/// (head and `Content-Length` body), records it, writes `script(n)` as raw bytes and closes.
async fn raw_server(
    script: Vec<&'static [u8]>,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        let mut conn = 0usize;
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let answer = script[conn.min(script.len() - 1)];
            conn += 1;
            let g = g.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap_or(0));
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                g.lock().unwrap().push(buf);
                let _ = s.write_all(answer).await;
                let _ = s.flush().await;
                drop(s);
            });
        }
    });
    (addr, got)
}

fn hyper_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>()
}

/// Responses the server wrote after it read the whole request, which hyper cannot read as a
/// response: a garbage status line, an unknown version, a header line without a colon, a
/// response head of 1 MiB, a `102 Processing` and then nothing. Each request reached the server:
/// a keyed POST is retried and every attempt sends the same key and bytes, and an unkeyed POST
/// is sent once; neither is ever reported as not sent or safe to send again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s81_wire_unreadable_responses_after_the_read_are_maybe_processed() {
    let huge: &'static [u8] = {
        let mut v = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        v.extend(std::iter::repeat_n(b'a', 1024 * 1024));
        v.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
        Box::leak(v.into_boxed_slice())
    };
    let answers: Vec<(&str, &'static [u8])> = vec![
        ("garbage", b"BANANA 200 OK\r\n\r\n"),
        ("version", b"HTTP/9.9 200 OK\r\ncontent-length: 0\r\n\r\n"),
        (
            "header",
            b"HTTP/1.1 200 OK\r\nno colon here\r\ncontent-length: 0\r\n\r\n",
        ),
        ("huge head", huge),
        ("102 then close", b"HTTP/1.1 102 Processing\r\n\r\n"),
    ];
    for (name, answer) in answers {
        // A keyed POST: retried, the same key and body each time, and maybe processed.
        let (addr, got) = raw_server(vec![answer]).await;
        let svc = RetryLayer::new()
            .with_seed(18)
            .with_backoff(Backoff::exponential(ms(5), ms(5)).unwrap())
            .layer(hyper_client());
        let url = format!("http://{addr}/orders");
        let out = tokio::time::timeout(
            secs(10),
            svc.clone()
                .oneshot(post_keyed(&url, "k-wire-lost", r#"{"item":"book"}"#)),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: hung"));
        let err = match out {
            Ok(res) => panic!("{name}: answered {}", res.status()),
            Err(e) => e,
        };
        let text = chain(&*err);
        assert_eq!(
            sturdy::core::classify::delivery(&*err),
            Delivery::MaybeProcessed,
            "{name}: {text}"
        );
        let e = sturdy_err(&err);
        let report = e
            .report()
            .unwrap_or_else(|| panic!("{name}: no report: {text}"));
        assert_eq!(report.delivery(), Delivery::MaybeProcessed, "{name}");
        assert!(report.attempts() >= 1, "{name}");
        assert!(!text.contains("not sent"), "{name}: {text}");
        assert!(!text.contains("safe to send again"), "{name}: {text}");
        assert!(e.to_string().contains("k-wire-lost"), "{name}: {e}");
        let seen = got.lock().unwrap().clone();
        assert_eq!(seen.len() as u32, report.attempts(), "{name}: {text}");
        for req in &seen {
            let s = String::from_utf8_lossy(req).to_ascii_lowercase();
            assert!(s.contains("idempotency-key: k-wire-lost"), "{name}");
            assert!(s.ends_with(r#"{"item":"book"}"#), "{name}");
        }

        // An unkeyed POST: sent once, maybe processed, never "safe to send again".
        let (addr, got) = raw_server(vec![answer]).await;
        let url = format!("http://{addr}/orders");
        let req = Request::post(&url)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let out = tokio::time::timeout(secs(10), svc.clone().oneshot(req))
            .await
            .unwrap_or_else(|_| panic!("{name}: hung"));
        let err = match out {
            Ok(res) => panic!("{name}: answered {}", res.status()),
            Err(e) => e,
        };
        let text = chain(&*err);
        assert_eq!(
            got.lock().unwrap().len(),
            1,
            "{name}: an unkeyed POST resent: {text}"
        );
        assert_eq!(
            sturdy::core::classify::delivery(&*err),
            Delivery::MaybeProcessed,
            "{name}: {text}"
        );
        assert!(!text.contains("not sent"), "{name}: {text}");
        assert!(!text.contains("safe to send again"), "{name}: {text}");
    }
}

// ===== ClientBuilder and the hold marks =====

/// `RetryLayer::with_hold_marks`: "`sturdy::ClientBuilder` turns it on when nobody said
/// otherwise here and every layer in its stack is its default or one of sturdy's; with a layer
/// of your own in one of its slots, it stays off"; on, "the rate limit refuses at once, with
/// `RateLimited`, a call whose turn would come after [the deadline]"; "Off, a deadline that ends
/// mid-attempt says the attempt may have been processed". A quota of 1 per 10 s, spent; then a
/// GET with a 1 s deadline: by default refused at once, not sent; with `with_hold_marks(false)`
/// said explicitly, or with a layer of one's own in the hedge slot, cut by the deadline after 1 s
/// and called maybe processed.
#[tokio::test(start_paused = true)]
async fn s81_client_builder_hold_marks_default_explicit_off_and_own_layer() {
    use sturdy::ratelimit::{Quota, RateLimitLayer};
    let quota = || RateLimitLayer::new(Quota::new(1, secs(10)).unwrap());
    let req = || {
        let mut r = get("http://api.example.com/items");
        r.extensions_mut()
            .insert(sturdy::core::CallOptions::new().with_deadline(secs(1)));
        r
    };
    assert_eq!(RetryLayer::new().hold_marks(), None);
    assert_eq!(
        RetryLayer::new().with_hold_marks(false).hold_marks(),
        Some(false)
    );

    for case in ["default", "explicit off", "own layer"] {
        let api = Api::new(|_, _| resp(200, None));
        let client: sturdy::Client<Full<Bytes>> = match case {
            "default" => sturdy::ClientBuilder::new()
                .with_retry(RetryLayer::new().with_seed(19))
                .with_rate_limit(quota())
                .build(api.clone()),
            "explicit off" => sturdy::ClientBuilder::new()
                .with_retry(RetryLayer::new().with_seed(19).with_hold_marks(false))
                .with_rate_limit(quota())
                .build(api.clone()),
            _ => sturdy::ClientBuilder::new()
                .with_retry(RetryLayer::new().with_seed(19))
                .with_hedge(tower::layer::layer_fn(|s| s))
                .with_rate_limit(quota())
                .build(api.clone()),
        };
        let first = tokio::time::timeout(
            secs(5),
            client.clone().oneshot(get("http://api.example.com/items")),
        )
        .await
        .expect("bounded")
        .unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        let started = Instant::now();
        let err = tokio::time::timeout(secs(60), client.clone().oneshot(req()))
            .await
            .expect("bounded")
            .unwrap_err();
        let took = started.elapsed();
        let delivery = sturdy::core::classify::delivery(&*err);
        assert_eq!(api.count(), 1, "{case}: the second call was sent");
        if case == "default" {
            assert_eq!(took, Duration::ZERO, "{case}: {}", chain(&*err));
            assert!(
                find::<RateLimited>(&*err).is_some(),
                "{case}: {}",
                chain(&*err)
            );
            assert_eq!(delivery, Delivery::NotSent, "{case}: {}", chain(&*err));
        } else {
            assert!(
                took >= secs(1) && took <= secs(1) + ms(5),
                "{case}: {took:?} {}",
                chain(&*err)
            );
            assert_eq!(
                delivery,
                Delivery::MaybeProcessed,
                "{case}: {}",
                chain(&*err)
            );
        }
    }
}

/// The crate docs: "an open circuit breaker whose `retry_in` fits the call's deadline (a
/// half-open one, whose probe is out, is looked at again every backoff base until the deadline;
/// such refusals sent nothing and use up neither attempts nor the retry budget)". Five
/// `Probing` refusals under a budget that allows no retry and 2 attempts, with a 10 s deadline:
/// looked at again every 250 ms (plus up to 20 %), then the call goes through. Without a
/// deadline: at once.
#[tokio::test(start_paused = true)]
async fn s81_probing_refusals_use_neither_attempts_nor_budget() {
    let probing = CircuitOpen::new("api.example.com", Duration::ZERO)
        .with_reason(sturdy::core::OpenReason::Probing);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let inner = Breaker {
        open: probing.clone(),
        refusals: 5,
        calls: calls.clone(),
    };
    let svc = RetryLayer::new()
        .with_seed(20)
        .with_max_attempts(2)
        .with_budget(secs(1), 0, 0.0)
        .unwrap()
        .with_deadline(secs(10))
        .layer(inner);
    let res = tokio::time::timeout(secs(60), svc.oneshot(get("http://api.example.com/")))
        .await
        .expect("bounded")
        .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), StatusCode::OK);
    let t = calls.lock().unwrap().clone();
    assert_eq!(t.len(), 6);
    for w in t.windows(2) {
        let g = w[1] - w[0];
        // A base, plus up to the 20 % a server's wait gets so callers do not look in lock-step.
        assert!(g >= ms(250) && g <= ms(301), "{g:?}");
    }

    let calls = Arc::new(Mutex::new(Vec::new()));
    let inner = Breaker {
        open: probing,
        refusals: 5,
        calls: calls.clone(),
    };
    let svc = RetryLayer::new().with_seed(20).layer(inner);
    let started = Instant::now();
    let err = tokio::time::timeout(secs(60), svc.oneshot(get("http://api.example.com/")))
        .await
        .expect("bounded")
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO, "{}", chain(&*err));
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert!(find::<CircuitOpen>(&*err).is_some());
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
}

/// retry.md: "for a POST or PATCH the message says what to do next: `...; the request was not
/// sent, so it is safe to send again` only when no attempt could have reached the server,
/// otherwise `...; it may have been processed: retry with the same idempotency key <key>`".
/// A PATCH through `ClientBuilder` (which keys PATCH): every response lost after the server
/// read the request, then the same PATCH to a port that refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s81_wire_patch_words_lost_and_refused() {
    let (addr, got) = raw_server(vec![b""]).await;
    let client = sturdy::ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_seed(21)
                .with_backoff(Backoff::exponential(ms(5), ms(5)).unwrap()),
        )
        .build(hyper_client());
    let req = Request::patch(format!("http://{addr}/orders/7"))
        .body(Full::new(Bytes::from_static(b"{\"qty\":2}")))
        .unwrap();
    let err = tokio::time::timeout(secs(10), client.clone().oneshot(req))
        .await
        .expect("bounded")
        .unwrap_err();
    let seen = got.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{}", chain(&*err));
    let keys: Vec<String> = seen
        .iter()
        .map(|r| {
            let s = String::from_utf8_lossy(r).to_string();
            s.lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("idempotency-key:")
                        .map(|v| v.trim().to_string())
                })
                .expect("a key on the wire")
        })
        .collect();
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    let e = sturdy_err(&err);
    let msg = e.to_string();
    assert!(msg.contains("gave up after 4 attempts"), "{msg}");
    assert!(
        msg.contains(&format!(
            "it may have been processed: retry with the same idempotency key {}",
            keys[0]
        )),
        "{msg}"
    );
    assert_eq!(e.report().unwrap().delivery(), Delivery::MaybeProcessed);
    assert_eq!(
        e.report().unwrap().idempotency_key(),
        Some(keys[0].as_str())
    );

    // A port nobody listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = l.local_addr().unwrap();
    drop(l);
    let req = Request::patch(format!("http://{refused}/orders/7"))
        .body(Full::new(Bytes::from_static(b"{\"qty\":2}")))
        .unwrap();
    let err = tokio::time::timeout(secs(10), client.oneshot(req))
        .await
        .expect("bounded")
        .unwrap_err();
    let e = sturdy_err(&err);
    let msg = e.to_string();
    assert!(
        msg.contains("the request was not sent, so it is safe to send again"),
        "{msg}"
    );
    assert!(!msg.contains("may have been processed"), "{msg}");
    assert_eq!(e.report().unwrap().delivery(), Delivery::NotSent);
    assert_eq!(e.report().unwrap().attempts(), 4, "{msg}");
}

// ===== a request's own attempt timeout bounds the body read =====

/// A body that yields `first`, then never another frame (its size hint says `total`).
struct Stalls {
    first: Option<Bytes>,
    total: u64,
}

impl From<Bytes> for Stalls {
    fn from(b: Bytes) -> Self {
        Self {
            total: b.len() as u64,
            first: Some(b),
        }
    }
}

impl Body for Stalls {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.first.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.total)
    }
}

/// retry.md: "A request body kept for a replay is read before the first attempt is sent; with
/// the retry layer's own attempt timeout (or a request's `CallOptions` one) that read counts as
/// the first attempt's, so a streamed body that stalls fails the call after the timeout with a
/// `Timeout` error, not sent". The layer has no attempt timeout of its own here: the request's
/// `CallOptions::with_attempt_timeout(2s)` bounds the read.
#[tokio::test(start_paused = true)]
async fn s81_a_requests_own_attempt_timeout_bounds_a_stalled_body_read() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_req: Request<Stalls>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(resp(200, None)) }
    });
    let svc = RetryLayer::new().with_seed(22).layer(inner);
    let mut req = Request::put("http://api.example.com/upload")
        .body(Stalls {
            first: Some(Bytes::from_static(b"12345")),
            total: 10,
        })
        .unwrap();
    req.extensions_mut()
        .insert(sturdy::core::CallOptions::new().with_attempt_timeout(secs(2)));
    let started = Instant::now();
    let err = tokio::time::timeout(secs(60), svc.oneshot(req))
        .await
        .expect("the stalled read was not bounded by the request's attempt timeout")
        .unwrap_err();
    let took = started.elapsed();
    assert!(took >= secs(2) && took <= secs(2) + ms(5), "{took:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::NotSent,
        "{}",
        chain(&*err)
    );
    let e = find::<SturdyError>(&*err).unwrap_or_else(|| panic!("{}", chain(&*err)));
    assert_eq!(
        *e.kind(),
        sturdy::core::ErrorKind::Timeout,
        "{}",
        chain(&*err)
    );
}

// ===== the budget under concurrent callers =====

/// The budget's arithmetic is tower's `TpsBudget`'s: with `percent` 0.5 and no reserve, each
/// call deposits half a retry, so however many threads call at once, the retries can never
/// outnumber half the calls. Four threads call as fast as they can for a second (with a
/// 1 ms backoff, ttl 1 s: windows of 100 ms move on under them); the retries scheduled are
/// counted against the calls made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s81_concurrent_callers_never_spend_more_than_the_budget_holds() {
    let calls = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let r = retries.clone();
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(resp(503, None))
    });
    let layer = RetryLayer::new()
        .with_seed(23)
        .with_backoff(Backoff::exponential(ms(1), ms(1)).unwrap())
        .with_max_attempts(2)
        .with_budget(secs(1), 0, 0.5)
        .unwrap()
        .on_event(move |e| {
            if matches!(e, Event::RetryScheduled { .. }) {
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
    let svc = layer.layer(inner);
    let end = Instant::now() + Duration::from_millis(1200);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let svc = svc.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                calls.fetch_add(1, Ordering::SeqCst);
                let res = svc
                    .clone()
                    .oneshot(get("http://api.example.com/"))
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(secs(10), t)
            .await
            .expect("bounded")
            .unwrap();
    }
    let (c, r) = (calls.load(Ordering::SeqCst), retries.load(Ordering::SeqCst));
    assert!(c > 100, "too few calls to say anything: {c}");
    assert!(r > 0, "no retry at all: {r} of {c}");
    assert!(2 * r <= c, "{r} retries for {c} calls at 50 %");
}

/// retry.md: "`report()` gives ... whether any attempt may have been processed"; "`...; the
/// request was not sent, so it is safe to send again` only when no attempt could have reached
/// the server". A keyed POST through `ClientBuilder` with a quota of 1 call per 10 s and a 5 s
/// deadline: its first attempt is answered 503; its retry's turn would come after the deadline,
/// so the rate limit refuses it unsent. The call as a whole may have been processed (the 503
/// answered a request that reached the server), and its words say so, with the key.
#[tokio::test(start_paused = true)]
async fn s81_client_builder_503_then_a_rate_turn_past_the_deadline_is_maybe_processed() {
    use sturdy::ratelimit::{Quota, RateLimitLayer};
    let api = Api::new(|_, _| resp(503, None));
    let client: sturdy::Client<Full<Bytes>> = sturdy::ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(24))
        .with_rate_limit(RateLimitLayer::new(Quota::new(1, secs(10)).unwrap()))
        .build(api.clone());
    let mut req = Request::post("http://api.example.com/orders")
        .body(Full::new(Bytes::from_static(b"{\"n\":1}")))
        .unwrap();
    req.extensions_mut()
        .insert(sturdy::core::CallOptions::new().with_deadline(secs(5)));
    let started = Instant::now();
    let err = tokio::time::timeout(secs(60), client.oneshot(req))
        .await
        .expect("bounded")
        .unwrap_err();
    assert!(started.elapsed() <= secs(5), "{:?}", started.elapsed());
    assert_eq!(api.count(), 1);
    let key = api.seen()[0]
        .key
        .clone()
        .expect("the builder keys a POST")
        .to_str()
        .unwrap()
        .to_string();
    let text = chain(&*err);
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::MaybeProcessed,
        "{text}"
    );
    let e = sturdy_err(&err);
    let report = e.report().expect("a report");
    assert_eq!(report.attempts(), 1, "{text}");
    assert_eq!(report.delivery(), Delivery::MaybeProcessed, "{text}");
    assert_eq!(report.idempotency_key(), Some(key.as_str()));
    let msg = e.to_string();
    assert!(!msg.contains("safe to send again"), "{msg}");
    assert!(
        msg.contains(&format!("retry with the same idempotency key {key}")),
        "{msg}"
    );
    assert_eq!(
        *e.kind(),
        sturdy::core::ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{msg}"
    );
}

/// retry.md "Where it may sit": "the first attempt goes to the service `poll_ready` made ready;
/// later attempts wait for readiness again on that same service". Driven by hand over
/// tower-test's mock: readiness is the mock's; an in-flight 409's retry, after its 2 s wait,
/// waits for the mock to be ready again and sends nothing before; then it sends the same key
/// and body.
#[tokio::test(start_paused = true)]
async fn s81_mock_an_in_flight_409_retry_waits_for_readiness_again() {
    use tokio_test::{assert_pending, assert_ready};
    let (mock, mut handle) =
        tower_test::mock::pair::<Request<Full<Bytes>>, Response<Full<Bytes>>>();
    let mut svc = RetryLayer::new().with_seed(25).layer(mock);
    let mut ready = tokio_test::task::spawn(());
    handle.allow(0);
    assert_pending!(ready.enter(|cx, _| svc.poll_ready(cx)));
    handle.allow(1);
    assert!(ready.is_woken());
    assert_ready!(ready.enter(|cx, _| svc.poll_ready(cx))).unwrap();
    let mut call = tokio_test::task::spawn(svc.call(post_keyed(
        "http://api.example.com/orders",
        "k-mock-409",
        "{\"n\":2}",
    )));
    assert_pending!(call.poll());
    let (req, send) = tokio::time::timeout(ms(10), handle.next_request())
        .await
        .expect("the first attempt")
        .expect("a request");
    assert_eq!(req.headers()["idempotency-key"], "k-mock-409");
    send.send_response(resp(409, Some(b"2")));
    assert_pending!(call.poll());
    // The wait, and past it: not ready, so nothing is sent.
    tokio::time::advance(secs(3)).await;
    assert_pending!(call.poll());
    assert!(
        tokio::time::timeout(ms(1), handle.next_request())
            .await
            .is_err(),
        "a retry sent to a service that was not ready"
    );
    handle.allow(1);
    assert_pending!(call.poll());
    let (req, send) = tokio::time::timeout(ms(10), handle.next_request())
        .await
        .expect("the retry once ready")
        .expect("a request");
    assert_eq!(req.headers()["idempotency-key"], "k-mock-409");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from_static(b"{\"n\":2}"));
    send.send_response(resp(201, None));
    let res = assert_ready!(call.poll()).unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
}

// ===== the budget's reserve at the edges of its parameters =====

/// How many of `n` calls made at the same instant (each a GET answered 503, 2 attempts) are
/// retried under `layer`.
async fn retried_of_a_burst(layer: RetryLayer, n: usize) -> usize {
    let retries = Arc::new(AtomicUsize::new(0));
    let r = retries.clone();
    let svc = layer
        .with_max_attempts(2)
        .on_event(move |e| {
            if matches!(e, Event::RetryScheduled { .. }) {
                r.fetch_add(1, Ordering::SeqCst);
            }
        })
        .layer(Api::new(|_, _| resp(503, None)));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.oneshot(get("http://api.example.com/")).await })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(secs(60), t)
            .await
            .expect("bounded")
            .unwrap()
            .unwrap();
    }
    retries.load(Ordering::SeqCst)
}

/// How many withdrawals tower's own `TpsBudget` allows at once, with no deposit.
fn towers_reserve(ttl: Duration, min_per_sec: u32, percent: f32) -> usize {
    use tower::retry::budget::{Budget, TpsBudget};
    let b = TpsBudget::new(ttl, min_per_sec, percent);
    (0..100_000).take_while(|_| b.withdraw()).count()
}

/// retry.md: the per-host budget has "a reserve of `min_per_sec × ttl` retries"; `ttl` may be
/// anything from 1 s to 60 s. With no percent (deposits add nothing), a burst spends exactly
/// the reserve: 10/s × 10 s = 100, 10/s × 1 s = 10, 10/s × 1.9 s = 19. (tower's `TpsBudget`,
/// whose arithmetic the docs also name, counts whole seconds of the ttl: 10.)
#[tokio::test(start_paused = true)]
async fn s81_the_reserve_is_min_per_sec_times_ttl() {
    // retry.md since this round: the ttl counts in whole seconds for the reserve.
    for (ttl, want) in [(secs(10), 100), (secs(1), 10), (ms(1900), 10)] {
        let layer = RetryLayer::new()
            .with_seed(26)
            .with_budget(ttl, 10, 0.0)
            .unwrap();
        let got = retried_of_a_burst(layer, 300).await;
        assert_eq!(
            got,
            want,
            "ttl {ttl:?} (tower's TpsBudget: {})",
            towers_reserve(ttl, 10, 0.0)
        );
    }
}

/// `percent` may be anything from 0.0 to 1000.0, and the reserve is `min_per_sec × ttl`
/// retries whatever it is: a percent of 1e-30 (one retry per 10^32 calls, in effect none) leaves
/// the reserve of 10/s × 10 s = 100 retries, as a percent of 0 does. (tower's `TpsBudget`
/// scales the reserve by `1 / percent`, which saturates: one retry.)
#[tokio::test(start_paused = true)]
async fn s81_a_tiny_percent_leaves_the_reserve_whole() {
    for percent in [0.0f32, 1e-6, 1e-30, f32::MIN_POSITIVE] {
        let layer = RetryLayer::new()
            .with_seed(27)
            .with_budget(secs(10), 10, percent)
            .unwrap();
        let got = retried_of_a_burst(layer, 300).await;
        assert_eq!(
            got,
            100,
            "percent {percent:e} (tower's TpsBudget: {})",
            towers_reserve(secs(10), 10, percent)
        );
    }
}

/// retry.md: the budget allows "`percent` of the calls made in the last `ttl`" on top of the
/// reserve (`with_budget`: "plus `percent` (0.0 to 1000.0, as a fraction: 0.2 is 20 %) of
/// calls"). With no reserve, 100 calls at once, each wanting one retry: at most `percent` of
/// them are retried (plus one for rounding). 0.2 and 0.25 hold; 0.3 gives 33, 0.4 gives 50,
/// 0.6 and 0.9 give 100 (tower's arithmetic: a retry costs `(1 / percent) as isize` deposits).
#[tokio::test(start_paused = true)]
async fn s81_percent_is_the_share_of_calls_retried() {
    // retry.md since this round: a retry costs `1 / percent` calls rounded down, so 0.3
    // allows 33 % and anything above 0.5 every call.
    let mut over = Vec::new();
    for (percent, share) in [
        (0.2f32, 0.2),
        (0.25, 0.25),
        (0.3, 1.0 / 3.0),
        (0.4, 0.5),
        (0.6, 1.0),
        (0.9, 1.0),
    ] {
        let layer = RetryLayer::new()
            .with_seed(28)
            .with_budget(secs(10), 0, percent)
            .unwrap();
        let got = retried_of_a_burst(layer, 100).await;
        let most = (share * 100.0f64).ceil() as usize + 1;
        if got > most {
            over.push(format!("{percent}: {got} of 100 retried"));
        }
    }
    assert!(over.is_empty(), "{over:?}");
}
