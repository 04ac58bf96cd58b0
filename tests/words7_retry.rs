//! docs/guides/retry.md and sturdy-retry's crate docs, read literally: which statuses are
//! retried, the 409 rule, `Retry-After` at its bounds (u64::MAX, negative, garbage, past and far
//! dates, repeated thousands of times), the 60 s ceiling and the 5-minute report cap, the
//! backoff's formula, settings' bounds, the body limit, POST safety, the deadline, the words of
//! the final error, and the loop's readiness under `ConcurrencyLimit(1)`, `GlobalConcurrencyLimit`
//! and `Buffer`, with a dropped call. Paused time, in process.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::core::events::Event;
use sturdy::core::{
    classify, find, BoxError, CallOptions, CallReport, CircuitOpen, Delivery, ErrorKind,
    RateLimited,
};
use sturdy::retry::RetryLayer;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

#[derive(Clone, Debug)]
enum Act {
    Status(u16, HeaderMap),
    Io(std::io::ErrorKind),
    Err(fn() -> BoxError),
    Pending,
}

fn st(code: u16) -> Act {
    Act::Status(code, HeaderMap::new())
}

fn ra(code: u16, value: &str) -> Act {
    let mut h = HeaderMap::new();
    h.insert("retry-after", HeaderValue::from_str(value).unwrap());
    Act::Status(code, h)
}

/// An API that answers the n-th call (from 0) with `script(n)`; records when each call came and
/// the length of each body.
#[derive(Clone)]
struct Api {
    script: Arc<dyn Fn(usize) -> Act + Send + Sync>,
    at: Arc<Mutex<Vec<Instant>>>,
    bodies: Arc<Mutex<Vec<usize>>>,
    calls: Arc<AtomicUsize>,
}

impl Api {
    fn new(script: impl Fn(usize) -> Act + Send + Sync + 'static) -> Self {
        Self {
            script: Arc::new(script),
            at: Arc::default(),
            bodies: Arc::default(),
            calls: Arc::default(),
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn gaps(&self) -> Vec<Duration> {
        let at = self.at.lock().unwrap();
        at.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

impl Service<Request<Full<Bytes>>> for Api {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>,
    >;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.at.lock().unwrap().push(Instant::now());
        let act = (self.script)(n);
        let bodies = self.bodies.clone();
        Box::pin(async move {
            let len = req.into_body().collect().await.unwrap().to_bytes().len();
            bodies.lock().unwrap().push(len);
            match act {
                Act::Status(s, h) => {
                    let mut res = Response::builder().status(s).body(Full::default()).unwrap();
                    *res.headers_mut() = h;
                    Ok(res)
                }
                Act::Io(kind) => Err(Box::new(std::io::Error::from(kind)) as BoxError),
                Act::Err(f) => Err(f()),
                Act::Pending => std::future::pending().await,
            }
        })
    }
}

fn get() -> Request<Full<Bytes>> {
    Request::get("http://api.example.com/orders")
        .body(Full::default())
        .unwrap()
}

fn post(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post("http://api.example.com/orders");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::from("{}")).unwrap()
}

/// retry.md:55-56 (and the crate docs): retried 408, 425, 429, 500, 502, 503, 504; never other
/// 4xx, 501, 505, 401.
#[tokio::test(start_paused = true)]
async fn the_retried_statuses_are_the_guides_list() {
    for code in [408, 425, 429, 500, 502, 503, 504] {
        let api = Api::new(move |n| st(if n == 0 { code } else { 200 }));
        let res = RetryLayer::new()
            .layer(api.clone())
            .oneshot(get())
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{code}");
        assert_eq!(api.calls(), 2, "{code}");
    }
    for code in [400, 401, 403, 404, 409, 410, 422, 451, 501, 505] {
        let api = Api::new(move |_| st(code));
        let res = RetryLayer::new()
            .layer(api.clone())
            .oneshot(get())
            .await
            .unwrap();
        assert_eq!(res.status(), code);
        assert_eq!(api.calls(), 1, "{code} was retried");
    }
}

/// retry.md:57-60 and :96-101: a 409 with `Retry-After` to a request with an `Idempotency-Key` is
/// retried after the wait; any other 409 is returned as it is; a 409 whose wait is not slept is
/// returned "with a `CallReport` in its extensions".
#[tokio::test(start_paused = true)]
async fn an_in_flight_409_is_retried_after_its_wait_and_any_other_409_returned() {
    let api = Api::new(|n| if n == 0 { ra(409, "3") } else { st(201) });
    let res = RetryLayer::new()
        .layer(api.clone())
        .oneshot(post(Some("k-1")))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let gap = api.gaps()[0];
    assert!(
        gap >= Duration::from_secs(3) && gap <= Duration::from_millis(3600),
        "{gap:?}"
    );

    // No key, or no Retry-After: a conflict.
    for (req, act) in [(post(None), ra(409, "3")), (post(Some("k-2")), st(409))] {
        let api = Api::new(move |_| act.clone());
        let res = RetryLayer::new()
            .layer(api.clone())
            .oneshot(req)
            .await
            .unwrap();
        assert_eq!(res.status(), 409);
        assert_eq!(api.calls(), 1);
    }

    // A wait longer than 60 s: returned as it is, with a CallReport.
    let api = Api::new(|_| ra(409, "120"));
    let res = RetryLayer::new()
        .layer(api.clone())
        .oneshot(post(Some("k-3")))
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(api.calls(), 1);
    let report = res
        .extensions()
        .get::<CallReport>()
        .expect("a CallReport in the extensions");
    assert_eq!(report.attempts(), 1);
    assert_eq!(report.idempotency_key(), Some("k-3"));
}

/// retry.md:47-48 and :96-101: `Retry-After` honoured up to 60 s, never sooner, plus up to 20 %;
/// longer, it is not slept: the call fails at once with `RateLimited`, whose wait is the server's
/// capped at 5 min (docs/RELIABILITY.md:41: "or `max_retry_after` when longer").
#[tokio::test(start_paused = true)]
async fn retry_after_is_slept_up_to_60s_and_reported_capped_beyond() {
    for secs in [1u64, 10, 60] {
        let api = Api::new(move |n| {
            if n == 0 {
                ra(503, &secs.to_string())
            } else {
                st(200)
            }
        });
        RetryLayer::new()
            .layer(api.clone())
            .oneshot(get())
            .await
            .unwrap();
        let gap = api.gaps()[0];
        let want = Duration::from_secs(secs);
        assert!(
            gap >= want && gap <= want.mul_f64(1.2),
            "Retry-After: {secs} slept {gap:?}"
        );
    }
    for (value, reported) in [
        ("61", 61u64),
        ("3600", 300),
        ("18446744073709551615", 300),
        ("184467440737095516150", 300),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 300),
    ] {
        for code in [429, 503] {
            let api = Api::new(move |_| ra(code, value));
            let start = Instant::now();
            let err = RetryLayer::new()
                .layer(api.clone())
                .oneshot(get())
                .await
                .unwrap_err();
            assert_eq!(start.elapsed(), Duration::ZERO, "{value}");
            assert_eq!(api.calls(), 1);
            let rl = find::<RateLimited>(&*err).unwrap_or_else(|| panic!("{value}: {err}"));
            assert_eq!(rl.retry_after(), Duration::from_secs(reported), "{value}");
        }
    }
    // A ceiling above 5 min: the report may reach it.
    let api = Api::new(|_| ra(503, "1200"));
    let err = RetryLayer::new()
        .with_max_retry_after(Duration::from_secs(600))
        .layer(api)
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(600)
    );
}

/// retry.md:96-97: a `Retry-After` that is negative or garbage asks for nothing: the call is
/// retried on the backoff (at least its 250 ms base), never failed for it; a date in the past is
/// "now" (retried soon). Repeated thousands of times, the header changes nothing.
#[tokio::test(start_paused = true)]
async fn a_retry_after_that_cannot_be_read_falls_back_to_the_backoff() {
    let api = Api::new(|n| {
        if n == 0 {
            ra(503, "Sun, 06 Nov 1994 08:49:47 GMT")
        } else {
            st(200)
        }
    });
    let res = RetryLayer::new()
        .layer(api.clone())
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        api.gaps()[0] <= Duration::from_millis(750),
        "{:?}",
        api.gaps()
    );
    for value in [
        "-5",
        "soon",
        "1.5",
        "",
        "Mon, 01 Jan 0001 00:00:00 GMT",
        "99999999999999999999999999999999999999999x",
    ] {
        let api = Api::new(move |n| if n == 0 { ra(503, value) } else { st(200) });
        let res = RetryLayer::new()
            .layer(api.clone())
            .oneshot(get())
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{value:?}");
        let gap = api.gaps()[0];
        assert!(
            gap >= Duration::from_millis(250) && gap <= Duration::from_millis(750),
            "{value:?}: {gap:?}"
        );
    }
    // 5,000 copies of `Retry-After: 2`, then of a long one after a short one.
    let mut many = HeaderMap::new();
    for _ in 0..5000 {
        many.append("retry-after", HeaderValue::from_static("2"));
    }
    let api = Api::new(move |n| {
        if n == 0 {
            Act::Status(503, many.clone())
        } else {
            st(200)
        }
    });
    RetryLayer::new()
        .layer(api.clone())
        .oneshot(get())
        .await
        .unwrap();
    let gap = api.gaps()[0];
    assert!(
        gap >= Duration::from_secs(2) && gap <= Duration::from_millis(2400),
        "{gap:?}"
    );
}

/// retry.md:97-101 and :131-133: with no attempt left or past the deadline, a 429/503 with
/// `Retry-After` ends as `RateLimited`, "also on the last attempt"; without `Retry-After` the last
/// response is returned as it is.
#[tokio::test(start_paused = true)]
async fn a_wait_not_slept_ends_as_rate_limited_even_on_the_last_attempt() {
    let api = Api::new(|_| ra(503, "5"));
    let err = RetryLayer::new()
        .with_max_attempts(1)
        .layer(api.clone())
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(5)
    );
    let api = Api::new(|_| ra(429, "5"));
    let err = RetryLayer::new()
        .with_deadline(Duration::from_secs(3))
        .layer(api.clone())
        .oneshot(get())
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*err).is_some(), "{err}");
    assert_eq!(api.calls(), 1);
    let api = Api::new(|_| st(503));
    let res = RetryLayer::new()
        .layer(api.clone())
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(api.calls(), 4);
}

/// retry.md:90-93: "`sleep = min(cap, random_between(base, 3 * previous sleep))` with base 250 ms
/// and cap 20 s ... a client that keeps failing waits at or near the cap".
#[tokio::test(start_paused = true)]
async fn the_default_backoff_follows_the_formula() {
    let delays = Arc::new(Mutex::new(Vec::new()));
    let d = delays.clone();
    for seed in 0..200u64 {
        d.lock().unwrap().push(None);
        let d = d.clone();
        let layer = RetryLayer::new()
            .with_seed(seed)
            .with_max_attempts(25)
            .without_budget()
            .on_event(move |e| {
                if let Event::RetryScheduled { delay, .. } = e {
                    d.lock().unwrap().push(Some(*delay));
                }
            });
        let _ = layer
            .layer(Api::new(|_| st(503)))
            .oneshot(get())
            .await
            .unwrap();
    }
    let all = delays.lock().unwrap().clone();
    let runs: Vec<Vec<Duration>> = all
        .split(Option::is_none)
        .filter(|r| !r.is_empty())
        .map(|r| r.iter().map(|d| d.unwrap()).collect())
        .collect();
    assert_eq!(runs.len(), 200);
    let (base, cap) = (Duration::from_millis(250), Duration::from_secs(20));
    let mut late_at_cap = 0u32;
    let mut late = 0u32;
    let mut late_sum = Duration::ZERO;
    for run in &runs {
        assert_eq!(run.len(), 24);
        let mut prev = base;
        for (i, d) in run.iter().enumerate() {
            assert!(*d >= base && *d <= cap, "{run:?}");
            assert!(*d <= (prev * 3).min(cap), "retry {i}: {d:?} after {prev:?}");
            prev = *d;
            if i >= 12 {
                late += 1;
                late_sum += *d;
                if *d == cap {
                    late_at_cap += 1;
                }
            }
        }
    }
    // Drawn on [base, 3 * previous] then capped, a failing client's sleeps settle at a mean of
    // about 10.5 s, a third of them at the cap; drawn on [base, min(cap, 3 * previous)] they
    // would average about 6.4 s and almost never reach it (the guide's "about 40 % shorter").
    let mean = late_sum / late;
    let at_cap = f64::from(late_at_cap) / f64::from(late);
    assert!(
        mean >= Duration::from_millis(9000) && mean <= Duration::from_secs(12),
        "{mean:?}"
    );
    assert!((0.2..0.45).contains(&at_cap), "{at_cap}");
}

/// retry.md:105-108: "`.with_max_attempts(n)` [4] (0 is taken as 1)"; the budget "validated
/// when you call it: `ttl` 1 s to 60 s, `percent` 0.0 to 1000.0".
#[tokio::test(start_paused = true)]
async fn attempts_and_budget_settings_take_their_bounds() {
    let api = Api::new(|_| st(503));
    RetryLayer::new()
        .with_max_attempts(0)
        .layer(api.clone())
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(api.calls(), 1);
    let s = Duration::from_secs;
    assert!(RetryLayer::new().with_budget(s(1), 10, 0.0).is_ok());
    assert!(RetryLayer::new().with_budget(s(60), 10, 1000.0).is_ok());
    assert!(RetryLayer::new()
        .with_budget(Duration::from_millis(999), 10, 0.2)
        .is_err());
    assert!(RetryLayer::new().with_budget(s(61), 10, 0.2).is_err());
    assert!(RetryLayer::new().with_budget(s(10), 10, -0.01).is_err());
    assert!(RetryLayer::new().with_budget(s(10), 10, 1000.5).is_err());
    assert!(RetryLayer::new().with_budget(s(10), 10, f32::NAN).is_err());
    let e = RetryLayer::new().with_budget(s(61), 10, 0.2).unwrap_err();
    assert_eq!(*e.kind(), ErrorKind::Config);
}

/// retry.md:48-49 and the crate docs: "a body whose size hint proves it fits the limit [1 MiB] is
/// buffered and every attempt sends the same bytes; a larger ... body is sent once, not retried".
#[tokio::test(start_paused = true)]
async fn bodies_up_to_1_mib_are_replayed_and_larger_ones_sent_once() {
    const MIB: usize = 1024 * 1024;
    let api = Api::new(|n| st(if n == 0 { 503 } else { 200 }));
    let req = Request::put("http://api.example.com/blob")
        .body(Full::from(vec![7u8; MIB]))
        .unwrap();
    let res = RetryLayer::new()
        .layer(api.clone())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(api.bodies.lock().unwrap().clone(), vec![MIB, MIB]);

    let api = Api::new(|n| st(if n == 0 { 503 } else { 200 }));
    let req = Request::put("http://api.example.com/blob")
        .body(Full::from(vec![7u8; MIB + 1]))
        .unwrap();
    let res = RetryLayer::new()
        .layer(api.clone())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(api.bodies.lock().unwrap().clone(), vec![MIB + 1]);
}

fn circuit_open() -> BoxError {
    Box::new(CircuitOpen::new(
        "api.example.com",
        Duration::from_millis(100),
    ))
}

fn local_limit() -> BoxError {
    Box::new(RateLimited::new(Duration::from_millis(100)))
}

/// retry.md:83-86: POST and PATCH are retried only with an `Idempotency-Key`, or "when the failure
/// proves the request never left (a refused connection, an open breaker, a local rate limit)";
/// :141-143: the words of each case, and a committed attempt is never followed by "not sent".
#[tokio::test(start_paused = true)]
async fn post_is_retried_with_a_key_or_when_it_never_left_and_says_so() {
    for method in [Method::POST, Method::PATCH] {
        let api = Api::new(|_| Act::Io(std::io::ErrorKind::ConnectionReset));
        let req = Request::builder()
            .method(method.clone())
            .uri("http://api.example.com/o")
            .body(Full::from("x"))
            .unwrap();
        let err = RetryLayer::new()
            .layer(api.clone())
            .oneshot(req)
            .await
            .unwrap_err();
        assert_eq!(api.calls(), 1, "{method} without a key was retried");
        assert_eq!(classify::delivery(&*err), Delivery::MaybeProcessed);
        assert!(!err.to_string().contains("not sent"), "{err}");
    }
    // Never left: retried without a key, and said to be safe to send again.
    for act in [
        Act::Io(std::io::ErrorKind::ConnectionRefused),
        Act::Err(circuit_open),
        Act::Err(local_limit),
    ] {
        let api = Api::new(move |_| act.clone());
        let err = RetryLayer::new()
            .with_deadline(Duration::from_secs(30))
            .layer(api.clone())
            .oneshot(post(None))
            .await
            .unwrap_err();
        assert_eq!(api.calls(), 4, "{err}");
        assert_eq!(classify::delivery(&*err), Delivery::NotSent, "{err}");
        assert!(
            err.to_string()
                .ends_with("the request was not sent, so it is safe to send again"),
            "{err}"
        );
    }
    // A reset (may have been processed), then refusals: never "not sent".
    let api = Api::new(|n| {
        if n == 0 {
            Act::Io(std::io::ErrorKind::ConnectionReset)
        } else {
            Act::Io(std::io::ErrorKind::ConnectionRefused)
        }
    });
    let err = RetryLayer::new()
        .layer(api.clone())
        .oneshot(post(Some("key-7")))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 4);
    let msg = err.to_string();
    assert!(msg.contains("connection refused"), "{msg}");
    assert!(
        msg.ends_with("it may have been processed: retry with the same idempotency key key-7"),
        "{msg}"
    );
    let report = err
        .downcast_ref::<sturdy::core::Error>()
        .unwrap()
        .report()
        .unwrap()
        .clone();
    assert_eq!(report.attempts(), 4);
    assert_eq!(report.delivery(), Delivery::MaybeProcessed);
    assert_eq!(report.idempotency_key(), Some("key-7"));
}

/// retry.md:109-110: "no sleep is started that would end past it, and an attempt still running at
/// the deadline is abandoned".
#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_sleeps_and_abandons_a_running_attempt() {
    let api = Api::new(|_| st(503));
    let start = Instant::now();
    let res = RetryLayer::new()
        .with_deadline(Duration::from_millis(200))
        .layer(api.clone())
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(
        api.calls(),
        1,
        "a sleep of at least 250 ms was started with 200 ms left"
    );
    assert_eq!(start.elapsed(), Duration::ZERO);

    let api = Api::new(|_| Act::Pending);
    let start = Instant::now();
    let err = RetryLayer::new()
        .with_deadline(Duration::from_secs(3))
        .layer(api)
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(classify::classify_error(&*err), ErrorKind::Timeout);
    // Per request: `CallOptions::with_max_attempts` and `with_deadline`.
    let api = Api::new(|_| st(503));
    let mut req = get();
    req.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(2));
    RetryLayer::new()
        .layer(api.clone())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(api.calls(), 2);
}

/// retry.md:136-138: "its `kind()` is the last attempt's, and its message names the root cause in
/// plain words: `gave up after 4 attempts: connection reset by peer`, `connection refused`".
#[tokio::test(start_paused = true)]
async fn the_final_error_names_the_root_cause() {
    let api = Api::new(|_| Act::Io(std::io::ErrorKind::ConnectionReset));
    let err = RetryLayer::new()
        .layer(api)
        .oneshot(get())
        .await
        .unwrap_err();
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("one sturdy_core::Error");
    assert_eq!(*e.kind(), ErrorKind::Transport);
    assert!(
        err.to_string()
            .starts_with("gave up after 4 attempts: connection reset"),
        "{err}"
    );
    assert!(find::<std::io::Error>(&*err).is_some());

    let api = Api::new(|n| {
        if n < 3 {
            st(503)
        } else {
            Act::Io(std::io::ErrorKind::ConnectionRefused)
        }
    });
    let err = RetryLayer::new()
        .layer(api)
        .oneshot(get())
        .await
        .unwrap_err();
    let e = err.downcast_ref::<sturdy::core::Error>().unwrap();
    assert_eq!(*e.kind(), ErrorKind::Connect);
    assert!(err.to_string().contains("connection refused"), "{err}");
}

/// retry.md:151-155: "later attempts wait for readiness again on that same service ... It works
/// over `ConcurrencyLimit`, `GlobalConcurrencyLimit` and `Buffer`, driven by `oneshot` or by a
/// kept service"; and a call dropped while it sleeps leaves nothing held.
#[tokio::test(start_paused = true)]
async fn the_loop_keeps_readiness_under_limits_and_buffer_and_a_dropped_call_frees_them() {
    let api = Api::new(|n| st(if n % 3 == 2 { 200 } else { 503 }));
    let limited = tower::limit::ConcurrencyLimit::new(api.clone(), 1);
    let mut kept = RetryLayer::new().without_budget().layer(limited);
    let run = async {
        for _ in 0..3 {
            let res = kept.ready().await?.call(get()).await?;
            assert_eq!(res.status(), 200);
        }
        Ok::<_, BoxError>(())
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("no deadlock")
        .unwrap();

    let sem = Arc::new(tokio::sync::Semaphore::new(1));
    let global =
        tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(sem.clone()).layer(api.clone());
    let buffered = tower::buffer::Buffer::new(RetryLayer::new().without_budget().layer(global), 1);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let mut svc = buffered.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                let res = svc.ready().await?.call(get()).await?;
                assert!(res.status() == 200 || res.status() == 503);
            }
            Ok::<_, BoxError>(())
        }));
    }
    let all = async {
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(600), all)
        .await
        .expect("no deadlock");

    // Dropped while sleeping before its second attempt: the permit is back, the next call works.
    let api = Api::new(|n| st(if n == 0 { 503 } else { 200 }));
    let mut kept = RetryLayer::new().layer(tower::limit::ConcurrencyLimit::new(api.clone(), 1));
    let fut = kept.ready().await.unwrap().call(get());
    let dropped = tokio::time::timeout(Duration::from_millis(100), fut).await;
    assert!(dropped.is_err());
    assert_eq!(api.calls(), 1);
    let res = tokio::time::timeout(Duration::from_secs(5), async {
        kept.ready().await.unwrap().call(get()).await.unwrap()
    })
    .await
    .expect("the permit of the dropped call was not given back");
    assert_eq!(res.status(), 200);
}
