//! Round s60, outside tests of the client-side rate limiter (`sturdy::ratelimit`) and the circuit
//! breaker (`sturdy::circuit`), alone and inside `ClientBuilder`, against
//! docs/guides/ratelimit.md, docs/guides/circuit.md, README.md, docs/RELIABILITY.md and the
//! rustdoc of both crates: wait values a server may send that earlier rounds did not (leading
//! zeros, the obsolete HTTP date forms, a reset with leading zeros), a 429 that must not pause
//! twice (limiter pause plus retry sleep), what a 429 the client gives up on says about delivery,
//! waiters and probes cancelled at every await or panicking in `call` itself, zero open periods,
//! a refusal that keeps a `ConcurrencyLimit(1)` permit, and probes under `Buffer` and timeouts.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::classify::delivery;
use sturdy::core::clock::ManualClock;
use sturdy::core::{find, BoxError, CallOptions, CircuitOpen, Delivery, OpenReason, RateLimited};
use sturdy::ratelimit::{PauseCapped, Quota, RateLimitLayer, DEFAULT_MAX_PAUSE};
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

type Req = Request<()>;
type Res = Response<()>;
type BoxFut<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

const HOST: &str = "api.example.com";
/// 2019-06-03T11:00:00Z.
const NOW: u64 = 1_559_559_600;

fn get(host: &str) -> Req {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

fn full_get() -> Request<Full<Bytes>> {
    Request::get(format!("http://{HOST}/x"))
        .body(Full::default())
        .unwrap()
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::at(UNIX_EPOCH + Duration::from_secs(NOW)))
}

// What the scripted service does with the next call.
const OK: usize = 0;
const FAIL: usize = 1;
const HANG: usize = 2;
const PANIC: usize = 3;
const TOO_MANY: usize = 4;
const PANIC_IN_FUTURE: usize = 5;

/// A service whose answer is set from outside: 200, 500, hang forever, panic in `call` itself
/// (before any future exists), 429 with scripted headers, or panic in its future. Counts calls.
#[derive(Clone, Default)]
struct Script {
    mode: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    headers: Arc<Mutex<Vec<(String, Vec<u8>)>>>,
    /// A mode for the next call only, then back to `mode` (usize::MAX: none).
    once: Arc<AtomicUsize>,
}

impl Script {
    fn new() -> Self {
        let s = Self::default();
        s.once.store(usize::MAX, Ordering::SeqCst);
        s
    }
    fn set(&self, mode: usize) {
        self.mode.store(mode, Ordering::SeqCst);
    }
    fn next_once(&self, mode: usize) {
        self.once.store(mode, Ordering::SeqCst);
    }
    fn headers(&self, h: &[(&str, &[u8])]) {
        *self.headers.lock().unwrap() = h
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect();
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn respond<B: Default + Send + 'static>(&self) -> BoxFut<Response<B>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let once = self.once.swap(usize::MAX, Ordering::SeqCst);
        let mode = if once == usize::MAX {
            self.mode.load(Ordering::SeqCst)
        } else {
            once
        };
        let headers = self.headers.lock().unwrap().clone();
        match mode {
            PANIC => panic!("the inner service panicked in call"),
            HANG => Box::pin(std::future::pending()),
            PANIC_IN_FUTURE => Box::pin(async { panic!("the inner future panicked") }),
            _ => {
                let status = match mode {
                    FAIL => 500,
                    TOO_MANY => 429,
                    _ => 200,
                };
                let mut b = Response::builder().status(status);
                if mode == TOO_MANY {
                    for (k, v) in headers {
                        b = b.header(k, v);
                    }
                }
                let res = b.body(B::default()).unwrap();
                Box::pin(async move { Ok(res) })
            }
        }
    }
    fn service(
        &self,
    ) -> impl Service<Req, Response = Res, Error = Infallible, Future = BoxFut<Res>>
           + Clone
           + Send
           + Sync
           + 'static {
        let s = self.clone();
        service_fn(move |_req: Req| s.respond::<()>())
    }
    fn http(
        &self,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = BoxFut<Response<Full<Bytes>>>,
    > + Clone
           + Send
           + Sync
           + 'static {
        let s = self.clone();
        service_fn(move |_req: Request<Full<Bytes>>| s.respond::<Full<Bytes>>())
    }
}

/// A fresh adaptive-only layer (clock at `NOW`) over a service answering one response with
/// `status` and `headers`: the pause it leaves on the key and its `PauseCapped`, if any.
async fn pause_after(
    status: u16,
    headers: &[(&str, &[u8])],
) -> (Option<Duration>, Option<PauseCapped>) {
    let owned: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
        .collect();
    let api = service_fn(move |_req: Req| {
        let mut b = Response::builder().status(status);
        for (k, v) in &owned {
            b = b.header(k.as_str(), v.as_slice());
        }
        let res = b.body(()).unwrap();
        async move { Ok::<_, Infallible>(res) }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().with_clock(clock()).pair();
    let mut svc = layer.layer(api);
    let res = svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    assert_eq!(res.status().as_u16(), status);
    (
        handle.pause(HOST),
        res.extensions().get::<PauseCapped>().cloned(),
    )
}

fn secs(d: Option<Duration>) -> f64 {
    d.unwrap_or_default().as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Rate limiter: the values a server sends.
// ---------------------------------------------------------------------------------------------

/// ratelimit.md: "a 429 or 503 with `Retry-After` (seconds or an HTTP date)" pauses every caller
/// "until then", and the cap is for "a bogus value" only: "honest pauses are kept as sent".
/// `Retry-After: 0000000000000000000000000000001` is one second written with leading zeros (RFC
/// 9110's `delay-seconds = 1*DIGIT`): it must pause one second, not lock the host out for the
/// five-minute cap as if it were an overflowing number.
#[tokio::test(start_paused = true)]
async fn s60_rl_retry_after_with_leading_zeros_is_what_it_says() {
    for (value, want) in [
        ("01".to_owned(), 1.0),
        ("0000000000000000000000000000001".to_owned(), 1.0),
        (format!("{}2", "0".repeat(64 * 1024)), 2.0),
        ("00000000000000000000".to_owned(), 0.0),
    ] {
        let (pause, capped) = pause_after(429, &[("retry-after", value.as_bytes())]).await;
        let shown = &value[value.len().saturating_sub(12)..];
        assert!(
            (secs(pause) - want).abs() < 0.01 || (want == 0.0 && secs(pause) <= 1.0),
            "Retry-After: …{shown} ({} bytes) paused {pause:?}, not {want} s",
            value.len()
        );
        assert!(capped.is_none(), "…{shown}: reported as capped: {capped:?}");
    }
}

/// ratelimit.md: the reset is read as "seconds to wait (whole or decimal), a Unix time in seconds
/// (from 10^9, whole or decimal) or milliseconds (from 10^12)": by its value. A reset of 5
/// written with leading zeros (`0000000000005`, thirteen characters) is 5 seconds to wait, not a
/// millisecond time in 1970.
#[tokio::test(start_paused = true)]
async fn s60_rl_x_ratelimit_reset_with_leading_zeros_is_read_by_value() {
    for reset in ["5", "0000000005", "0000000000005", "00000000000000000005"] {
        let (pause, _) = pause_after(
            200,
            &[
                ("x-ratelimit-remaining", b"0"),
                ("x-ratelimit-reset", reset.as_bytes()),
            ],
        )
        .await;
        assert_eq!(
            pause,
            Some(Duration::from_secs(5)),
            "X-RateLimit-Reset: {reset}"
        );
    }
}

/// ratelimit.md: `Retry-After` in "seconds or an HTTP date". RFC 9110 §5.6.7: "A recipient that
/// parses a timestamp value in an HTTP field MUST accept all three HTTP-date formats" (IMF-fixdate,
/// the obsolete RFC 850 form and asctime). The clock reads 2019-06-03T11:00:00Z; each date below
/// is 30 s later.
#[tokio::test(start_paused = true)]
async fn s60_rl_retry_after_in_every_http_date_form() {
    for date in [
        "Mon, 03 Jun 2019 11:00:30 GMT",
        "Monday, 03-Jun-19 11:00:30 GMT",
        "Mon Jun  3 11:00:30 2019",
    ] {
        let (pause, _) = pause_after(429, &[("retry-after", date.as_bytes())]).await;
        assert_eq!(pause, Some(Duration::from_secs(30)), "Retry-After: {date}");
    }
}

/// ratelimit.md: the pauses come from "a 429 or 503 with `Retry-After`"; `RateLimit` and
/// `X-RateLimit-*` count "on any status", `Retry-After` does not. A `Retry-After` on a 200, a 301
/// or a 404 pauses nothing; on a 503 it pauses even with bare-503 pauses off ("A 503 with
/// `Retry-After` pauses either way"); and a wait header "sets a pause, not a pace".
#[tokio::test(start_paused = true)]
async fn s60_rl_retry_after_counts_on_429_and_503_only() {
    for status in [200, 201, 301, 404, 500] {
        let (pause, _) = pause_after(status, &[("retry-after", b"30")]).await;
        assert_eq!(pause, None, "Retry-After: 30 on a {status}");
    }
    let (pause, _) = pause_after(503, &[("retry-after", b"30")]).await;
    assert_eq!(pause, Some(Duration::from_secs(30)));

    let script = Script::new();
    script.set(TOO_MANY);
    script.headers(&[("retry-after", b"2")]);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(script.service());
    svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(handle.pause(HOST), Some(Duration::from_secs(2)));
    assert_eq!(handle.learned_pace(HOST), None);
}

/// Hostile magnitudes in every wait header at once on one 429 (2^63 and 2^64 seconds, a date in
/// 9999, `t=2^63`, an epoch reset in the far future): RELIABILITY.md "at most `max_pause` \[5
/// min\]; a longer one is stored as the cap and reported once (`PauseCapped` ...)". Repeated
/// `Retry-After` lines with a huge and a small value: never more than the cap, never a panic.
#[tokio::test(start_paused = true)]
async fn s60_rl_hostile_magnitudes_everywhere_cost_at_most_the_cap() {
    let cases: Vec<Vec<(&str, &[u8])>> = vec![
        vec![("retry-after", b"9223372036854775808")],
        vec![("retry-after", b"18446744073709551616")],
        vec![("retry-after", b"Fri, 31 Dec 9999 23:59:59 GMT")],
        vec![("ratelimit", b"\"d\";r=0;t=9223372036854775807")],
        vec![
            ("x-ratelimit-remaining", b"0"),
            ("x-ratelimit-reset", b"99999999999999999999999"),
        ],
        vec![
            ("retry-after", b"99999999999999999999"),
            ("retry-after", b"1"),
        ],
        vec![
            ("retry-after", b"1"),
            ("retry-after", b"99999999999999999999"),
        ],
        vec![
            ("retry-after", b"18446744073709551615"),
            ("ratelimit", b"\"d\";r=0;t=18446744073709551615"),
            ("ratelimit-remaining", b"0"),
            ("ratelimit-reset", b"18446744073709551615"),
        ],
    ];
    for headers in cases {
        let (pause, _) = pause_after(429, &headers).await;
        let p = pause.unwrap_or_else(|| panic!("{headers:?}: a 429 paused nothing"));
        assert!(p <= DEFAULT_MAX_PAUSE, "{headers:?}: {p:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limiter inside ClientBuilder.
// ---------------------------------------------------------------------------------------------

/// ratelimit.md: a 429 with `Retry-After` "pause[s] every caller of the host", and the retry
/// layer retries "after the wait" (retry's docs: "never shortened and with up to +20 % jitter").
/// Both wait for the same second: the retried call must go about one second after the 429, not
/// wait for the pause and then sleep the whole second again. Other callers of the host go once
/// the second has passed.
#[tokio::test(start_paused = true)]
async fn s60_client_retry_after_1_is_waited_once_not_twice() {
    let script = Script::new();
    script.headers(&[("retry-after", b"1")]);
    script.next_once(TOO_MANY);
    let client = sturdy::ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(7))
        .build(script.http());
    let start = Instant::now();
    let res = client.clone().oneshot(full_get()).await.unwrap();
    let took = start.elapsed();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(script.calls(), 2);
    assert!(
        took >= Duration::from_secs(1) && took <= Duration::from_millis(1300),
        "a 429 with Retry-After: 1 held the call {took:?}"
    );
}

/// README: errors say "whether any attempt may have been processed"; core's `Delivery::NotSent`
/// is "No attempt of the call reached the server", and `MaybeProcessed` covers an attempt the
/// server "answered (any status, even a 4xx)". A keyed POST answered `429 Retry-After: 120`,
/// which the client does not sleep, was sent: its error must not claim `NotSent` nor say "not
/// sent", and it keeps the idempotency key. The next POST, refused by the pause it left, was
/// not sent, and says so.
#[tokio::test(start_paused = true)]
async fn s60_client_429_given_up_on_was_sent() {
    let script = Script::new();
    script.headers(&[("retry-after", b"120")]);
    script.set(TOO_MANY);
    let client = sturdy::ClientBuilder::new().build(script.http());
    let post = || {
        Request::post(format!("http://{HOST}/orders"))
            .body(Full::from("{}"))
            .unwrap()
    };
    let err = client.clone().oneshot(post()).await.unwrap_err();
    assert_eq!(script.calls(), 1);
    let limited = find::<RateLimited>(&*err).expect("RateLimited in the chain");
    assert_eq!(limited.retry_after(), Duration::from_secs(120));
    assert_eq!(
        delivery(&*err),
        Delivery::MaybeProcessed,
        "the 429 answered a request that was sent: {err}"
    );
    assert!(!err.to_string().contains("not sent"), "{err}");

    let err = client.clone().oneshot(post()).await.unwrap_err();
    assert_eq!(script.calls(), 1, "the second POST reached the server");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(err.to_string().contains(HOST), "{err}");
}

/// ratelimit.md / RELIABILITY.md: "a call whose turn would come after its deadline is refused at
/// once with `RateLimited` carrying the wait (not sent)". A hostile `Retry-After` (2^64 s) is
/// capped at 5 min; a call with a deadline of `Duration::MAX` ("read as about 30 years") then
/// waits the cap at most and goes, and the waits any refusal carries are at most the cap.
#[tokio::test(start_paused = true)]
async fn s60_client_hostile_retry_after_with_an_endless_deadline() {
    let script = Script::new();
    script.headers(&[("retry-after", b"18446744073709551616")]);
    script.next_once(TOO_MANY);
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::MAX)
        .pair();
    let client = sturdy::ClientBuilder::new()
        .with_rate_limit(layer)
        .build(script.http());
    let mut req = full_get();
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let res = client.clone().oneshot(req).await;
    match res {
        Ok(r) => assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS),
        Err(e) => {
            let l = find::<RateLimited>(&*e).expect("RateLimited");
            assert!(l.retry_after() <= DEFAULT_MAX_PAUSE, "{e}");
        }
    }
    assert_eq!(handle.pause(HOST), Some(DEFAULT_MAX_PAUSE));
    let start = Instant::now();
    let mut req = full_get();
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::MAX));
    let res = client.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let took = start.elapsed();
    assert!(
        took >= DEFAULT_MAX_PAUSE && took <= DEFAULT_MAX_PAUSE + Duration::from_secs(1),
        "{took:?}"
    );
    assert_eq!(script.calls(), 2);
}

/// lib.rs (ratelimit): "A call that would wait longer than `max_wait` fails at once with
/// `RateLimited`, without calling the inner service", and README: "Every layer keeps tower's
/// readiness contract, so the client ... can sit ... over a `ConcurrencyLimit`, driven by ... a
/// kept `ready().await?.call(req)`". A kept client over `ConcurrencyLimit(1)` whose call is
/// refused by a pause (not sent) must not keep the only permit: another clone of the client,
/// made ready afterwards, gets it once the pause is cleared.
#[tokio::test(start_paused = true)]
async fn s60_client_refused_call_does_not_keep_the_concurrency_permit() {
    let script = Script::new();
    script.headers(&[("retry-after", b"300")]);
    script.next_once(TOO_MANY);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let client = sturdy::ClientBuilder::new()
        .with_rate_limit(layer)
        .build(tower::limit::ConcurrencyLimit::new(script.http(), 1));
    let mut once = full_get();
    once.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let _ = client.clone().oneshot(once).await;
    assert!(handle.pause(HOST).is_some());

    let mut kept = client.clone();
    let err = kept
        .ready()
        .await
        .unwrap()
        .call(full_get())
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*err).is_some(), "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    handle.clear_pause(HOST);
    // `kept` stays alive, idle, as a kept service in a struct would.
    let other = tokio::time::timeout(Duration::from_secs(5), client.clone().oneshot(full_get()))
        .await
        .expect("another clone waited for the permit a refused call kept")
        .unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    drop(kept);
}

/// circuit.md: "Open: `CircuitOpen { retry_in }` at once, and the inner service is not called";
/// "It works over `ConcurrencyLimit` ... with `oneshot` or a kept service". A kept breaker over
/// `ConcurrencyLimit(1)` whose call is refused must not keep the only permit from the other
/// clones once the breaker closes.
#[tokio::test(start_paused = true)]
async fn s60_cb_refused_call_does_not_keep_the_concurrency_permit() {
    let script = Script::new();
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(script.service());
    handle.force_open(HOST);
    let mut kept = svc.clone();
    let err = kept
        .ready()
        .await
        .unwrap()
        .call(get(HOST))
        .await
        .unwrap_err();
    assert!(err.is::<CircuitOpen>(), "{err}");
    handle.force_close(HOST);
    let res = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(get(HOST)))
        .await
        .expect("another clone waited for the permit a refused call kept")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    drop(kept);
}

/// The same through `ClientBuilder` (README: "Every layer keeps tower's readiness contract, so
/// the client ... can sit ... over a `ConcurrencyLimit`, driven by ... a kept
/// `ready().await?.call(req)`"): a kept client whose call an open breaker refuses does not keep
/// the permit of a `ConcurrencyLimit(1)` around the HTTP client from the other clones.
#[tokio::test(start_paused = true)]
async fn s60_client_breaker_refusal_does_not_keep_the_concurrency_permit() {
    let script = Script::new();
    let (cb, handle) = CircuitBreakerLayer::new().pair();
    let client = sturdy::ClientBuilder::new()
        .with_circuit_breaker(cb)
        .build(tower::limit::ConcurrencyLimit::new(script.http(), 1));
    handle.force_open(HOST);
    let mut kept = client.clone();
    let err = kept
        .ready()
        .await
        .unwrap()
        .call(full_get())
        .await
        .unwrap_err();
    assert_eq!(open_reason(&err), OpenReason::Forced, "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    handle.force_close(HOST);
    let res = tokio::time::timeout(Duration::from_secs(5), client.clone().oneshot(full_get()))
        .await
        .expect("another clone waited for the permit a refused call kept")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    drop(kept);
}

/// ratelimit's `RateLimit` docs: "A call that would wait longer than `max_wait` fails at once
/// with `RateLimited`, without calling the inner service", and the layer "may sit over ...
/// `ConcurrencyLimit` ..., driven by ... a kept service". The bare layer over
/// `ConcurrencyLimit(1)`: a kept service refused by a pause does not keep the permit.
#[tokio::test(start_paused = true)]
async fn s60_rl_refused_call_does_not_keep_the_concurrency_permit() {
    let script = Script::new();
    script.headers(&[("retry-after", b"300")]);
    script.next_once(TOO_MANY);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(script.service());
    svc.clone().oneshot(get(HOST)).await.unwrap();
    let mut kept = svc.clone();
    let err = kept
        .ready()
        .await
        .unwrap()
        .call(get(HOST))
        .await
        .unwrap_err();
    assert!(err.is::<RateLimited>(), "{err}");
    handle.clear_pause(HOST);
    let res = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(get(HOST)))
        .await
        .expect("another clone waited for the permit a refused call kept")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    drop(kept);
}

// ---------------------------------------------------------------------------------------------
// Rate limiter: waiters, handles, slow start.
// ---------------------------------------------------------------------------------------------

/// ratelimit.md: `handle.clear_pause(..)` "ends it now; waiting calls leave at the pace below"
/// (slow start: "one call leaves when the pause ends; each released call that gets an answer
/// other than 429 or 503 lets one more out"). Five calls waiting for a capped 5-minute pause
/// all go, without the clock moving, once it is cleared.
#[tokio::test(start_paused = true)]
async fn s60_rl_clear_pause_releases_the_line_now() {
    let script = Script::new();
    script.headers(&[("retry-after", b"99999")]);
    script.next_once(TOO_MANY);
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(600))
        .pair();
    let svc = layer.layer(script.service());
    svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(handle.pause(HOST), Some(DEFAULT_MAX_PAUSE));
    let start = Instant::now();
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(get(HOST))))
        .collect();
    settle().await;
    assert_eq!(handle.waiting(HOST), 5);
    assert_eq!(handle.clear_pause(HOST), Some(DEFAULT_MAX_PAUSE));
    for t in tasks {
        let res = tokio::time::timeout(Duration::from_millis(1), t)
            .await
            .expect("a waiter still held after clear_pause")
            .unwrap()
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(script.calls(), 6);
    assert!(start.elapsed() <= Duration::from_millis(1));
    assert_eq!(handle.waiting(HOST), 0);
}

/// ratelimit.md (slow start): "one still waiting when its `max_wait` has passed fails then with
/// `RateLimited` (suggesting the default pause), also when a released call never answers". The
/// released call hangs; the one behind it fails at its `max_wait`, with the layer's default pause
/// (7 s here) as its wait, naming the host; and once the hanging call is dropped ("a released
/// call gives its place back when it ... is dropped") the next call goes at once.
#[tokio::test(start_paused = true)]
async fn s60_rl_slow_start_behind_a_call_that_never_answers() {
    let script = Script::new();
    script.headers(&[("retry-after", b"1")]);
    script.next_once(TOO_MANY);
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(3))
        .with_default_pause(Duration::from_secs(7))
        .pair();
    let svc = layer.layer(script.service());
    svc.clone().oneshot(get(HOST)).await.unwrap();
    script.set(HANG);
    let hanging = tokio::spawn(svc.clone().oneshot(get(HOST)));
    settle().await;
    let start = Instant::now();
    let behind = tokio::spawn(svc.clone().oneshot(get(HOST)));
    settle().await;
    tokio::time::advance(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(script.calls(), 2, "the first waiter was released");
    let err = behind.await.unwrap().unwrap_err();
    let took = start.elapsed();
    assert_eq!(took, Duration::from_secs(3), "{err}");
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert_eq!(limited.retry_after(), Duration::from_secs(7), "{err}");
    assert!(err.to_string().contains(HOST), "{err}");
    assert_eq!(handle.waiting(HOST), 0);

    hanging.abort();
    let _ = hanging.await;
    script.set(OK);
    let res = tokio::time::timeout(Duration::from_millis(1), svc.clone().oneshot(get(HOST)))
        .await
        .expect("the line stayed shut after the hanging call was dropped")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// ratelimit.md: "a released call gives its place back when it finishes, fails, is dropped or
/// panics". The call released after a pause panics in the inner service's `call` itself (not in
/// its future); the call behind it must still be released at once, not held until `max_wait`.
#[tokio::test(start_paused = true)]
async fn s60_rl_released_call_panicking_in_call_gives_its_place_back() {
    let script = Script::new();
    script.headers(&[("retry-after", b"1")]);
    script.next_once(TOO_MANY);
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(20))
        .pair();
    let svc = layer.layer(script.service());
    svc.clone().oneshot(get(HOST)).await.unwrap();
    script.next_once(PANIC);
    let first = tokio::spawn(svc.clone().oneshot(get(HOST)));
    settle().await;
    let second = tokio::spawn(svc.clone().oneshot(get(HOST)));
    settle().await;
    assert_eq!(handle.waiting(HOST), 2);
    let start = Instant::now();
    tokio::time::advance(Duration::from_secs(1)).await;
    settle().await;
    assert!(first.await.unwrap_err().is_panic());
    let res = tokio::time::timeout(Duration::from_millis(100), second)
        .await
        .expect("the call behind a panicked released call was held")
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(start.elapsed() <= Duration::from_millis(1100));
}

/// lib.rs (ratelimit): "Nothing is reserved while a call waits: a call dropped in line leaves it".
/// A kept service over `Buffer` whose call future is dropped right after its first poll, while a
/// 10 s pause holds it: the line empties, and after the pause the next caller goes at once (it is
/// not queued behind a ghost).
#[tokio::test(start_paused = true)]
async fn s60_rl_waiter_dropped_after_first_poll_under_buffer() {
    let script = Script::new();
    script.headers(&[("retry-after", b"10")]);
    script.next_once(TOO_MANY);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let mut svc = tower::buffer::Buffer::new(layer.layer(script.service()), 8);
    svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    for _ in 0..50 {
        let fut = svc.ready().await.unwrap().call(get(HOST));
        let mut fut = tokio_test::task::spawn(fut);
        assert!(fut.poll().is_pending());
        settle().await;
        drop(fut);
    }
    settle().await;
    assert_eq!(handle.waiting(HOST), 0);
    tokio::time::advance(Duration::from_secs(10)).await;
    let start = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_millis(1),
        svc.ready().await.unwrap().call(get(HOST)),
    )
    .await
    .expect("held behind dropped waiters")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(script.calls(), 2);
}

/// ratelimit.md: "Zero `max_wait`: the layer never waits", and a refusal carries "the wait".
/// Quota 1 per 30 years: the refusal's wait is at most about 30 years, the message names the host
/// and a finite wait, and nothing panics.
#[tokio::test(start_paused = true)]
async fn s60_rl_refusal_of_a_30_year_quota() {
    let script = Script::new();
    let layer =
        RateLimitLayer::new(Quota::new(1, Duration::MAX).unwrap()).with_max_wait(Duration::ZERO);
    let svc = layer.layer(script.service());
    svc.clone().oneshot(get(HOST)).await.unwrap();
    let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert!(
        limited.retry_after() <= Duration::from_secs(31 * 366 * 86_400)
            && limited.retry_after() >= Duration::from_secs(29 * 365 * 86_400),
        "{:?}",
        limited.retry_after()
    );
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("rate limited by {HOST}; retry after ")),
        "{text}"
    );
    assert_eq!(script.calls(), 1);
}

// ---------------------------------------------------------------------------------------------
// Circuit breaker: probes cancelled, panicking, answered with 4xx.
// ---------------------------------------------------------------------------------------------

/// A breaker that opens on one failure, open for `open`.
fn breaker(open: Duration) -> (CircuitBreakerLayer, sturdy::circuit::CircuitHandle) {
    CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(open, open)
        .pair()
}

fn open_reason(err: &BoxError) -> OpenReason {
    find::<CircuitOpen>(&**err)
        .unwrap_or_else(|| panic!("not CircuitOpen: {err}"))
        .reason()
}

/// Opens the breaker of `HOST` with one 500 and waits out the open period.
async fn trip<S>(svc: &S, script: &Script, open: Duration)
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone,
{
    script.next_once(FAIL);
    let res = svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    tokio::time::advance(open).await;
}

/// circuit.md: "Half-open: 1 probe at a time ...; everyone else fails fast"; "A probe whose future
/// is dropped gives its slot back". A kept service's probe future dropped before its first poll
/// (made by `call`, never awaited), then one dropped after its first poll: each time the next
/// call is admitted as the probe, and a good probe closes.
#[tokio::test(start_paused = true)]
async fn s60_cb_probe_dropped_before_and_after_first_poll() {
    let script = Script::new();
    let (layer, handle) = breaker(Duration::from_secs(1));
    let mut svc = layer.layer(script.service());
    trip(&svc, &script, Duration::from_secs(1)).await;

    // Never polled.
    script.set(HANG);
    let fut = svc.ready().await.unwrap().call(get(HOST));
    drop(fut);
    // Polled once.
    let fut = svc.ready().await.unwrap().call(get(HOST));
    let mut fut = tokio_test::task::spawn(fut);
    assert!(fut.poll().is_pending());
    let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
    assert_eq!(open_reason(&err), OpenReason::Probing, "{err}");
    assert_eq!(
        find::<CircuitOpen>(&*err).unwrap().retry_in(),
        Duration::ZERO
    );
    drop(fut);

    script.set(OK);
    let res = svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// circuit.md: "A probe whose future is dropped gives its slot back"; RELIABILITY's spirit: no
/// breaker stuck half-open. The inner service panics in `call` itself while the breaker is
/// half-open (the probe's future never exists): the breaker must admit the next probe, not
/// refuse every call with "probe calls are testing" forever.
#[tokio::test(start_paused = true)]
async fn s60_cb_probe_panicking_in_call_does_not_wedge_half_open() {
    let script = Script::new();
    let (layer, handle) = breaker(Duration::from_secs(1));
    let mut svc = layer.layer(script.service());
    trip(&svc, &script, Duration::from_secs(1)).await;

    script.next_once(PANIC);
    let ready = svc.ready().await.unwrap();
    let caught = std::panic::catch_unwind(AssertUnwindSafe(|| {
        drop(ready.call(get(HOST)));
    }));
    assert!(caught.is_err(), "the service did not panic");
    let res = svc.clone().oneshot(get(HOST)).await;
    match res {
        Ok(res) => assert_eq!(res.status(), StatusCode::OK),
        Err(err) => panic!(
            "stuck after a probe panicked in call: {err} (state {:?})",
            handle.state(HOST)
        ),
    }
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// The same with the panic in the probe's future, on a spawned task (the task dies, its future is
/// dropped while unwinding): the next probe is admitted.
#[tokio::test(start_paused = true)]
async fn s60_cb_probe_panicking_in_its_future_gives_its_slot_back() {
    let script = Script::new();
    let (layer, handle) = breaker(Duration::from_secs(1));
    let svc = layer.layer(script.service());
    trip(&svc, &script, Duration::from_secs(1)).await;
    script.next_once(PANIC_IN_FUTURE);
    let t = tokio::spawn(svc.clone().oneshot(get(HOST)));
    assert!(t.await.unwrap_err().is_panic());
    let res = svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// circuit.md: "4xx, 429 and 401 are not failures". A probe answered 429 or 404 says nothing bad
/// of the dependency: it must not reopen the breaker, and it must not keep the probe slot either
/// (the next call goes to the dependency).
#[tokio::test(start_paused = true)]
async fn s60_cb_probe_answered_429_does_not_wedge_or_reopen() {
    let script = Script::new();
    let (layer, handle) = breaker(Duration::from_secs(1));
    let svc = layer.layer(script.service());
    trip(&svc, &script, Duration::from_secs(1)).await;
    script.next_once(TOO_MANY);
    let res = svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        !matches!(handle.state(HOST), Some(CircuitState::Open { .. })),
        "a 429 probe reopened: {:?}",
        handle.state(HOST)
    );
    let before = script.calls();
    let res = svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(script.calls(), before + 1);
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// circuit.md: "`.with_successes_to_close(m)` good probes close"; "A probe whose future is
/// dropped gives its slot back" (and is not counted). Two probes at a time, two successes to
/// close: one good probe and one dropped leave it half-open; one more good probe closes.
#[tokio::test(start_paused = true)]
async fn s60_cb_dropped_probe_is_not_a_success() {
    let script = Script::new();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .with_probes(2)
        .with_successes_to_close(2)
        .pair();
    let svc = layer.layer(script.service());
    trip(&svc, &script, Duration::from_secs(1)).await;
    script.next_once(HANG);
    let mut hanging = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert!(hanging.poll().is_pending());
    svc.clone().oneshot(get(HOST)).await.unwrap();
    // Both slots were taken until now; one came back.
    drop(hanging);
    assert_eq!(handle.state(HOST), Some(CircuitState::HalfOpen));
    svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// circuit.md: "Setters never panic; values that cannot work are taken as the nearest that can".
/// A zero open period (`with_open_duration(0, 0)`) must not lock the host out: right after the
/// breaker opens, the next call is admitted as a probe, and a good one closes it.
#[tokio::test(start_paused = true)]
async fn s60_cb_zero_open_period_does_not_lock_out() {
    let script = Script::new();
    let (layer, handle) = breaker(Duration::ZERO);
    let svc = layer.layer(script.service());
    trip(&svc, &script, Duration::ZERO).await;
    let res = svc.clone().oneshot(get(HOST)).await;
    match res {
        Ok(r) => assert_eq!(r.status(), StatusCode::OK),
        Err(e) => panic!("zero open period refused: {e}"),
    }
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// circuit.md: open "30 s, doubling on each re-opening up to 5 min
/// (`.with_open_duration(base, max)`)"; the setter: "Stays open `base` the first time, doubling on
/// each re-opening up to `max`"; "values that cannot work are taken as the nearest that can".
/// With `base` above `max` (10 min and 1 min) the first refusal says 10 min, then the re-opened
/// breaker is open for less than the first time (the "doubling" shrinks): no open period should
/// pass `max`.
#[tokio::test(start_paused = true)]
async fn s60_cb_open_base_above_max() {
    let script = Script::new();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(600), Duration::from_secs(60))
        .pair();
    let svc = layer.layer(script.service());
    trip(&svc, &script, Duration::ZERO).await;
    let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
    let first = find::<CircuitOpen>(&*err).unwrap().retry_in();
    // Wait out whatever it is, fail the probe, and read the second period.
    tokio::time::advance(first).await;
    script.next_once(FAIL);
    let res = svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let second = match handle.state(HOST) {
        Some(CircuitState::Open { retry_in }) => retry_in,
        other => panic!("{other:?}"),
    };
    assert!(
        first <= Duration::from_secs(60) && second <= Duration::from_secs(60),
        "max is 60 s; open {first:?} the first time, {second:?} after re-opening: {err}"
    );
}

/// circuit.md: `Failing` says "it has been failing ... try again in 12s". The refusal's words
/// name the host and a wait that is not zero while `retry_in` is not (with 400 ms left, "try
/// again in 0s" would send the caller straight back into a refusal).
#[tokio::test(start_paused = true)]
async fn s60_cb_failing_message_never_says_zero_while_open() {
    let script = Script::new();
    let (layer, _handle) = breaker(Duration::from_secs(30));
    let svc = layer.layer(script.service());
    trip(&svc, &script, Duration::ZERO).await;
    tokio::time::advance(Duration::from_millis(29_600)).await;
    let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
    let open = find::<CircuitOpen>(&*err).unwrap();
    assert_eq!(open.reason(), OpenReason::Failing);
    assert!(open.retry_in() > Duration::ZERO);
    let text = err.to_string();
    assert!(text.contains(HOST), "{text}");
    assert!(text.contains("has been failing"), "{text}");
    assert!(!text.ends_with(" 0s"), "{text}");
    assert!(
        !text.contains("not sent") || text.contains("was not"),
        "{text}"
    );
}

/// circuit.md: "It works over `ConcurrencyLimit` and `Buffer`"; a dropped probe "gives its slot
/// back". Under `Timeout(1 s)` over `Buffer` over the breaker, a probe that hangs is cut by the
/// timeout; the next call is admitted as the probe and closes the breaker.
#[tokio::test(start_paused = true)]
async fn s60_cb_probe_cut_by_timeout_over_buffer() {
    let script = Script::new();
    let (layer, handle) = breaker(Duration::from_secs(1));
    let inner = layer.layer(script.service());
    trip(&inner, &script, Duration::from_secs(1)).await;
    let mut svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .buffer(4)
        .service(inner);
    script.next_once(HANG);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(get(HOST))
        .await
        .unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    let res = svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

// ---------------------------------------------------------------------------------------------
// Both inside ClientBuilder.
// ---------------------------------------------------------------------------------------------

/// circuit.md: "an error for a call that never reached the dependency is not counted at all
/// (neither failure nor success, and a probe gets its slot back): a local rate-limit refusal".
/// In `ClientBuilder` (breaker above limiter): the half-open breaker's probe is refused by a
/// rate-limit pause (not sent); the breaker stays half-open with its slot free (the next calls
/// are refused by the limiter, not by "probe calls are testing"), and once the pause is cleared
/// the next call probes and closes it.
#[tokio::test(start_paused = true)]
async fn s60_client_probe_refused_by_the_limiter_gives_its_slot_back() {
    let script = Script::new();
    let (cb, cb_handle) = breaker(Duration::from_secs(1));
    let (rl, rl_handle) = RateLimitLayer::adaptive_only().pair();
    let client = sturdy::ClientBuilder::new()
        .with_circuit_breaker(cb)
        .with_rate_limit(rl.clone())
        .build(script.http());
    // The same limiter state without a breaker, to receive the 429 while the breaker is open.
    let side = sturdy::ClientBuilder::new()
        .without_circuit_breaker()
        .with_rate_limit(rl)
        .build(script.http());
    let once = || {
        let mut r = full_get();
        r.extensions_mut()
            .insert(CallOptions::new().without_retries());
        r
    };
    script.next_once(FAIL);
    let res = client.clone().oneshot(once()).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(matches!(
        cb_handle.state(HOST),
        Some(CircuitState::Open { .. })
    ));
    script.headers(&[("retry-after", b"300")]);
    script.next_once(TOO_MANY);
    let _ = side.clone().oneshot(once()).await;
    assert!(rl_handle.pause(HOST).is_some());
    tokio::time::advance(Duration::from_secs(1)).await;

    let calls = script.calls();
    for i in 0..5 {
        let err = client.clone().oneshot(once()).await.unwrap_err();
        assert!(
            find::<RateLimited>(&*err).is_some(),
            "call {i}: {err} (breaker {:?})",
            cb_handle.state(HOST)
        );
        assert_eq!(delivery(&*err), Delivery::NotSent);
    }
    assert_eq!(script.calls(), calls);
    assert!(
        !matches!(cb_handle.state(HOST), Some(CircuitState::Open { .. })),
        "local refusals reopened the breaker: {:?}",
        cb_handle.state(HOST)
    );
    rl_handle.clear_pause(HOST);
    let res = client.clone().oneshot(once()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(cb_handle.state(HOST), Some(CircuitState::Closed));
}

/// circuit.md: a half-open breaker's refusal is "looked at again every backoff base ... for as
/// long as the deadline allows"; "A probe whose future is dropped gives its slot back". In
/// `ClientBuilder`, the probe's caller is cancelled by an outer timeout while its request hangs;
/// a caller with a deadline that was refused with `Probing` meanwhile is admitted as the next
/// probe and succeeds, and the breaker closes.
#[tokio::test(start_paused = true)]
async fn s60_client_probe_caller_cancelled_mid_flight() {
    let script = Script::new();
    let (cb, handle) = breaker(Duration::from_secs(1));
    let client = sturdy::ClientBuilder::new()
        .with_circuit_breaker(cb)
        .build(script.http());
    let mut once = full_get();
    once.extensions_mut()
        .insert(CallOptions::new().without_retries());
    script.next_once(FAIL);
    client.clone().oneshot(once).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;

    script.next_once(HANG);
    let probe = tokio::spawn(tokio::time::timeout(
        Duration::from_secs(2),
        client.clone().oneshot(full_get()),
    ));
    settle().await;
    assert_eq!(handle.state(HOST), Some(CircuitState::HalfOpen));
    let mut req = full_get();
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(10)));
    let start = Instant::now();
    let waiter = tokio::spawn(client.clone().oneshot(req));
    assert!(probe.await.unwrap().is_err(), "the probe was not cut");
    let res = waiter.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

// ---------------------------------------------------------------------------------------------
// On the wire: a real server on loopback, real time, millisecond settings.
// ---------------------------------------------------------------------------------------------

/// ratelimit.md: a reset is read as "seconds to wait (whole or decimal)"; "a bare 429: 1 s
/// (`.with_default_pause(..)`)". Over real HTTP/1.1 through the default `ClientBuilder` and a
/// hyper-util client: a 429 whose `Retry-After` is not UTF-8 (with a 64 KiB header beside it)
/// pauses like a bare 429 (50 ms here), a 429 with `X-RateLimit-Reset: 0.2` holds the next
/// attempt at least 200 ms, and the call then succeeds; nothing panics and the call does not
/// take seconds.
#[tokio::test]
async fn s60_wire_hostile_and_decimal_waits_over_http() {
    use axum::body::Body;
    use http::HeaderValue;

    let hits = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/x",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                let n = {
                    let mut v = h.lock().unwrap();
                    v.push(Instant::now());
                    v.len()
                };
                let mut res = Response::new(Body::empty());
                match n {
                    1 => {
                        *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                        let hs = res.headers_mut();
                        hs.insert(
                            "retry-after",
                            HeaderValue::from_bytes(&[0xff, 0xfe, b'9']).unwrap(),
                        );
                        hs.insert(
                            "x-junk",
                            HeaderValue::from_str(&"a".repeat(64 * 1024)).unwrap(),
                        );
                    }
                    2 => {
                        *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                        let hs = res.headers_mut();
                        hs.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
                        hs.insert("x-ratelimit-reset", HeaderValue::from_static("0.2"));
                    }
                    _ => {}
                }
                res
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let (rl, handle) = RateLimitLayer::adaptive_only()
        .with_default_pause(Duration::from_millis(50))
        .pair();
    let client = sturdy::ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(3))
        .with_rate_limit(rl)
        .build(http);
    let start = Instant::now();
    let res = client
        .clone()
        .oneshot(
            Request::get(format!("http://{addr}/x"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let took = start.elapsed();
    assert_eq!(res.status(), StatusCode::OK);
    let times = hits.lock().unwrap().clone();
    assert_eq!(times.len(), 3, "{times:?}");
    let gap = times[2] - times[1];
    assert!(
        gap >= Duration::from_millis(195),
        "X-RateLimit-Reset: 0.2 held the next attempt only {gap:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(handle.pause(&addr.to_string()), None);
    server.abort();
}

// ---------------------------------------------------------------------------------------------
// Keys, handles and odd requests.
// ---------------------------------------------------------------------------------------------

/// The IETF draft the guide follows for `RateLimit`: "If a response contains both the RateLimit
/// and Retry-After fields, the Retry-After field MUST take precedence"; the guide lists the
/// older `RateLimit-Remaining` with a reset among the quota headers. A 429 with `Retry-After: 5`
/// and `RateLimit-Remaining: 0`, `RateLimit-Reset: 50` pauses 5 s, like the newer field.
#[tokio::test(start_paused = true)]
async fn s60_rl_retry_after_and_ratelimit_reset_together() {
    let (pause, _) = pause_after(
        429,
        &[
            ("retry-after", b"5"),
            ("ratelimit-remaining", b"0"),
            ("ratelimit-reset", b"50"),
        ],
    )
    .await;
    assert_eq!(pause, Some(Duration::from_secs(5)));
}

/// circuit.md: "One breaker per host"; ratelimit.md: "Keys are what the key extractor returns".
/// Requests a hostile caller can build (no authority, a `Host` header of non-UTF-8 bytes or of
/// 64 KiB, an IPv6 literal, a port of 65535), and handles asked about keys no request had (empty,
/// `*`, 64 KiB, a NUL): nothing panics, one failing host opens only its own breaker, and a pause
/// on one host holds no other.
#[tokio::test(start_paused = true)]
async fn s60_odd_requests_and_keys_do_not_panic_or_leak_across_hosts() {
    let script = Script::new();
    let (cb, cb_handle) = breaker(Duration::from_secs(30));
    let (rl, rl_handle) = RateLimitLayer::adaptive_only().pair();
    let svc = ServiceBuilder::new()
        .layer(cb)
        .layer(rl)
        .service(script.service());
    let big = "h".repeat(64 * 1024);
    let mut odd: Vec<Req> = vec![
        Request::get("/relative").body(()).unwrap(),
        Request::get("http://[::1]:65535/x").body(()).unwrap(),
    ];
    let mut r = Request::get("/relative").body(()).unwrap();
    r.headers_mut().insert(
        "host",
        http::HeaderValue::from_bytes(&[0xff, 0xfe, b'.', b'x']).unwrap(),
    );
    odd.push(r);
    let mut r = Request::get("/relative").body(()).unwrap();
    r.headers_mut()
        .insert("host", http::HeaderValue::from_str(&big).unwrap());
    odd.push(r);
    for req in odd {
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    for key in ["", "*", big.as_str(), "a\0b", "API.EXAMPLE.COM."] {
        let _ = rl_handle.pause(key);
        let _ = rl_handle.waiting(key);
        let _ = rl_handle.learned_pace(key);
        let _ = rl_handle.clear_pause(key);
        let _ = cb_handle.state(key);
    }
    cb_handle.force_open("");
    cb_handle.force_close("");

    // One host fails and is paused; the other is untouched.
    script.headers(&[("retry-after", b"60")]);
    script.next_once(FAIL);
    svc.clone().oneshot(get("a.example")).await.unwrap();
    assert!(matches!(
        cb_handle.state("a.example"),
        Some(CircuitState::Open { .. })
    ));
    let res = svc.clone().oneshot(get("b.example")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    script.next_once(TOO_MANY);
    svc.clone().oneshot(get("b.example")).await.unwrap();
    assert_eq!(rl_handle.pause("b.example"), Some(Duration::from_secs(60)));
    assert_eq!(rl_handle.pause("c.example"), None);
    let res = svc.clone().oneshot(get("c.example")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(cb_handle.state("b.example"), Some(CircuitState::Closed));
}

// ---------------------------------------------------------------------------------------------
// A remote quota store that misbehaves (an in-process `RemoteQuota`).
// ---------------------------------------------------------------------------------------------

/// What the store answers to `reserve`.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Grant(Duration),
    Deny(Duration),
    Fail,
    Hang,
}

#[derive(Debug)]
struct Store {
    answer: Mutex<Answer>,
    reserves: AtomicUsize,
    releases: AtomicUsize,
    keys: Mutex<Vec<String>>,
}

impl Store {
    fn new(answer: Answer) -> Arc<Self> {
        Arc::new(Self {
            answer: Mutex::new(answer),
            reserves: AtomicUsize::new(0),
            releases: AtomicUsize::new(0),
            keys: Mutex::new(Vec::new()),
        })
    }
    fn releases(&self) -> usize {
        self.releases.load(Ordering::SeqCst)
    }
}

impl sturdy::ratelimit::RemoteQuota for Store {
    fn reserve(
        &self,
        key: &str,
        _max_wait: Duration,
    ) -> sturdy::ratelimit::BoxFuture<Result<sturdy::ratelimit::Reserve, BoxError>> {
        use sturdy::ratelimit::Reserve;
        self.reserves.fetch_add(1, Ordering::SeqCst);
        self.keys.lock().unwrap().push(key.to_owned());
        let answer = *self.answer.lock().unwrap();
        Box::pin(async move {
            match answer {
                Answer::Grant(wait) => Ok(Reserve::Granted { wait }),
                Answer::Deny(retry_after) => Ok(Reserve::Denied { retry_after }),
                Answer::Fail => Err::<Reserve, BoxError>("store unreachable".into()),
                Answer::Hang => std::future::pending().await,
            }
        })
    }
    fn release(&self, _key: &str) -> sturdy::ratelimit::BoxFuture<Result<(), BoxError>> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::ready(Ok(())))
    }
}

fn remote_layer(store: &Arc<Store>) -> RateLimitLayer {
    RateLimitLayer::new(Quota::per_second(10).unwrap()).with_remote(store.clone())
}

/// ratelimit.md: "A call that waited for a Redis slot and was dropped ... gives the slot back
/// (`try_release`...)"; `RemoteQuota::release`: "The layer calls it once per unused grant, in the
/// background". A call granted a slot 5 s away, dropped after 2 s (an outer timeout): released
/// exactly once; a call that used its grant: never released. The store gets the host in lower
/// case.
#[tokio::test(start_paused = true)]
async fn s60_remote_grant_dropped_is_released_once() {
    let store = Store::new(Answer::Grant(Duration::from_secs(5)));
    let script = Script::new();
    let svc = remote_layer(&store).layer(script.service());
    let cut = tokio::time::timeout(
        Duration::from_secs(2),
        svc.clone().oneshot(get("API.Example.com")),
    )
    .await;
    assert!(cut.is_err());
    settle().await;
    assert_eq!(store.releases(), 1);
    assert_eq!(script.calls(), 0);
    assert_eq!(store.keys.lock().unwrap()[0], HOST);

    let start = Instant::now();
    svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    settle().await;
    assert_eq!(store.releases(), 1, "a used grant was given back");
    assert_eq!(script.calls(), 1);
}

/// `RemoteQuota::reserve`: "A grant further away than that (a store that breaks this contract) is
/// released and the call refused with `RateLimited`; a wait a store reports is capped at the
/// layer's `max_pause` before it reaches the caller". A store granting 100 s (past `max_wait`
/// 30 s), `Duration::MAX`, or denying with `Duration::MAX`: the call is refused at once, not sent,
/// each broken grant released once, and no refusal carries more than the 5-minute cap.
#[tokio::test(start_paused = true)]
async fn s60_remote_store_breaking_its_contract() {
    for (answer, grant) in [
        (Answer::Grant(Duration::from_secs(100)), true),
        (Answer::Grant(Duration::MAX), true),
        (Answer::Deny(Duration::MAX), false),
        (Answer::Deny(Duration::from_secs(u64::MAX / 2)), false),
    ] {
        let store = Store::new(answer);
        let script = Script::new();
        let svc = remote_layer(&store).layer(script.service());
        let start = Instant::now();
        let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO, "{answer:?}");
        let limited = err
            .downcast_ref::<RateLimited>()
            .unwrap_or_else(|| panic!("{answer:?}: {err}"));
        assert!(
            limited.retry_after() <= DEFAULT_MAX_PAUSE,
            "{answer:?}: {err}"
        );
        assert_eq!(script.calls(), 0);
        settle().await;
        assert_eq!(store.releases(), usize::from(grant), "{answer:?}");
    }
}

/// RELIABILITY.md: with `OnStoreError::Fail` "the call fails at once, not sent, with 'the
/// rate-limit store failed, so the call was not sent' (not counted by a circuit breaker) and
/// Redis's error as its source"; the default lets the call through.
#[tokio::test(start_paused = true)]
async fn s60_remote_store_failing_fail_closed_and_open() {
    let store = Store::new(Answer::Fail);
    let script = Script::new();
    let svc = remote_layer(&store).layer(script.service());
    svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(script.calls(), 1);

    let (cb, cb_handle) = breaker(Duration::from_secs(30));
    let svc = ServiceBuilder::new()
        .layer(cb)
        .layer(remote_layer(&store).with_on_store_error(sturdy::ratelimit::OnStoreError::Fail))
        .service(script.service());
    for _ in 0..3 {
        let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("the rate-limit store failed, so the call was not sent"),
            "{text}"
        );
        assert_eq!(delivery(&*err), Delivery::NotSent);
        let mut src = std::error::Error::source(&*err);
        let mut found = false;
        while let Some(s) = src {
            found |= s.to_string().contains("store unreachable");
            src = s.source();
        }
        assert!(found, "the store's error is not the source: {err:?}");
    }
    assert_eq!(cb_handle.state(HOST), Some(CircuitState::Closed));
    assert_eq!(script.calls(), 1);
}

/// RELIABILITY.md's bound table: "how long a call waits for a rate slot or a pause | `max_wait`
/// \[30 s\], then `RateLimited`". A custom store whose `reserve` never answers: the call still
/// ends by its `max_wait` (2 s here) rather than hanging forever.
#[ignore = "as documented: RemoteQuota's docs say each method bounds its own round trip and the layer does not time the store"]
#[tokio::test(start_paused = true)]
async fn s60_remote_store_that_never_answers_is_bounded_by_max_wait() {
    let store = Store::new(Answer::Hang);
    let script = Script::new();
    let svc = remote_layer(&store)
        .with_max_wait(Duration::from_secs(2))
        .layer(script.service());
    let res = tokio::time::timeout(Duration::from_secs(60), svc.clone().oneshot(get(HOST))).await;
    let inner = res.expect("a call waited 60 s on a store that never answers, max_wait 2 s");
    assert!(inner.is_ok() || inner.is_err());
    assert_eq!(store.reserves.load(Ordering::SeqCst), 1);
}

/// ratelimit.md: a remote slot "that a pause overtook, gives the slot back"; the handle: "(A call
/// waiting for a slot a remote store granted it is not in line.)". A call granted a slot 5 s
/// away, then a 429 `Retry-After: 120` from another call: the waiting call is not sent, is
/// refused with `RateLimited` by the time its slot would have come (not only after the pause),
/// and its slot is released once.
#[tokio::test(start_paused = true)]
async fn s60_remote_grant_overtaken_by_a_long_pause() {
    let store = Store::new(Answer::Grant(Duration::from_secs(5)));
    let script = Script::new();
    let layer = remote_layer(&store);
    let svc = layer.layer(script.service());
    let start = Instant::now();
    let waiting = tokio::spawn(svc.clone().oneshot(get(HOST)));
    settle().await;
    *store.answer.lock().unwrap() = Answer::Grant(Duration::ZERO);
    script.headers(&[("retry-after", b"120")]);
    script.next_once(TOO_MANY);
    let res = svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let err = waiting.await.unwrap().unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert!(
        start.elapsed() <= Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(limited.retry_after() <= Duration::from_secs(120), "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    settle().await;
    assert_eq!(store.releases(), 1);
    assert_eq!(script.calls(), 1);
}

/// ratelimit.md: "a bare 429: 1 s" — a 429 *with* `Retry-After: 0` is not bare: the server said
/// when (now). Through `ClientBuilder` the retried call goes after the retry layer's short spread
/// ("a `Retry-After: 0` is still spread (by up to 50 ms with the defaults)"), not after a 1 s
/// bare-429 pause, and the host is not paced.
#[tokio::test(start_paused = true)]
async fn s60_client_retry_after_0_is_not_a_bare_429() {
    let script = Script::new();
    script.headers(&[("retry-after", b"0")]);
    script.next_once(TOO_MANY);
    let (rl, handle) = RateLimitLayer::adaptive_only().pair();
    let client = sturdy::ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(11))
        .with_rate_limit(rl)
        .build(script.http());
    let start = Instant::now();
    let res = client.clone().oneshot(full_get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(400),
        "a 429 with Retry-After: 0 held the call {took:?}"
    );
    assert_eq!(handle.learned_pace(HOST), None);
    assert_eq!(script.calls(), 2);
}

/// ratelimit.md: the reset may be "an RFC 3339 date-time (`2026-12-05T03:00:00Z`)". RFC 3339 also
/// allows a numeric offset, fractional seconds and lower-case `t`/`z`; each date below is 30 s
/// (or 30.5 s) after the clock's 2019-06-03T11:00:00Z.
#[tokio::test(start_paused = true)]
async fn s60_rl_rfc3339_reset_forms() {
    for (reset, want) in [
        ("2019-06-03T11:00:30Z", 30_000),
        ("2019-06-03T13:00:30+02:00", 30_000),
        ("2019-06-03T06:00:30-05:00", 30_000),
        ("2019-06-03T11:00:30.500Z", 30_500),
        ("2019-06-03t11:00:30z", 30_000),
    ] {
        let (pause, _) = pause_after(
            200,
            &[
                ("x-ratelimit-remaining", b"0"),
                ("x-ratelimit-reset", reset.as_bytes()),
            ],
        )
        .await;
        assert_eq!(
            pause,
            Some(Duration::from_millis(want)),
            "X-RateLimit-Reset: {reset}"
        );
    }
}

/// The `Buffer` form of the kept-permit fault: ratelimit's `RateLimit` "may sit over ...
/// `Buffer`", and what the inner service reserved in `poll_ready` ("a `Buffer` slot") "is used by
/// this call and released with it". A kept service over `Buffer(bound 1)` whose call is refused
/// by a pause keeps its buffer slot: another clone cannot get ready.
#[tokio::test(start_paused = true)]
async fn s60_rl_refused_call_does_not_keep_the_buffer_slot() {
    let script = Script::new();
    script.headers(&[("retry-after", b"300")]);
    script.next_once(TOO_MANY);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .buffer(1)
        .service(script.service());
    svc.clone().oneshot(get(HOST)).await.unwrap();
    let mut kept = svc.clone();
    let err = kept
        .ready()
        .await
        .unwrap()
        .call(get(HOST))
        .await
        .unwrap_err();
    assert!(err.is::<RateLimited>(), "{err}");
    handle.clear_pause(HOST);
    let res = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(get(HOST)))
        .await
        .expect("another clone waited for the buffer slot a refused call kept")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    drop(kept);
}
