//! Outside tests of sturdy-hedge and sturdy-concurrency against docs/guides/hedge.md,
//! docs/guides/concurrency.md and the rustdoc of both crates: which methods are hedged, what a
//! second copy carries, the words of a double failure, settings taken into bounds, setters after
//! a handle; a limit lowered and raised while calls are in flight, first come first served,
//! hosts forgotten past the bound, the classification of overload. Paused time, in process.
#![cfg(feature = "full")]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, LimitReached};
use sturdy::core::{classify, find, BoxError, Delivery, ErrorKind};
use sturdy::hedge::HedgeLayer;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

type Body = Full<Bytes>;
type Fut = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// What the API does with one call.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// Answers this status after this long.
    Ok(Duration, u16),
    /// Fails with an io error of this kind after this long.
    Fail(Duration, std::io::ErrorKind),
    /// Fails with a sturdy error of this kind after this long.
    Sturdy(Duration, &'static str),
}

/// A marker put in a request's extensions.
#[derive(Clone, Debug, PartialEq)]
struct Tag(u32);

#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    uri: String,
    tag: Option<Tag>,
    key: Option<String>,
}

/// A scripted API: `script(n)` decides what the n-th call (from 0) does.
#[derive(Clone)]
struct Api {
    script: Arc<dyn Fn(usize) -> Act + Send + Sync>,
    seen: Arc<Mutex<Vec<Seen>>>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Api {
    fn new(script: impl Fn(usize) -> Act + Send + Sync + 'static) -> Self {
        Self {
            script: Arc::new(script),
            seen: Arc::default(),
            in_flight: Arc::default(),
            peak: Arc::default(),
        }
    }
    fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    fn service(
        &self,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future = Fut>
           + Clone
           + Send
           + Sync
           + 'static {
        let api = self.clone();
        tower::service_fn(move |req: Request<Body>| -> Fut {
            let n = {
                let mut seen = api.seen.lock().unwrap();
                seen.push(Seen {
                    method: req.method().clone(),
                    uri: req.uri().to_string(),
                    tag: req.extensions().get::<Tag>().cloned(),
                    key: req
                        .headers()
                        .get("idempotency-key")
                        .or_else(|| req.headers().get("x-request-key"))
                        .map(|v| v.to_str().unwrap().to_owned()),
                });
                seen.len() - 1
            };
            let act = (api.script)(n);
            let in_flight = api.in_flight.clone();
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            api.peak.fetch_max(now, Ordering::SeqCst);
            struct Out(Arc<AtomicUsize>);
            impl Drop for Out {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let out = Out(in_flight);
            Box::pin(async move {
                let _out = out;
                match act {
                    Act::Ok(d, code) => {
                        tokio::time::sleep(d).await;
                        let mut res = Response::new(Body::default());
                        *res.status_mut() = StatusCode::from_u16(code).unwrap();
                        Ok(res)
                    }
                    Act::Fail(d, kind) => {
                        tokio::time::sleep(d).await;
                        Err(Box::new(std::io::Error::new(kind, "scripted")) as BoxError)
                    }
                    Act::Sturdy(d, what) => {
                        tokio::time::sleep(d).await;
                        let kind = match what {
                            "timeout" => ErrorKind::Timeout,
                            _ => ErrorKind::Other,
                        };
                        Err(Box::new(sturdy::core::Error::new(kind, what)) as BoxError)
                    }
                }
            })
        })
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn req(method: Method, uri: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::default())
        .unwrap()
}

const U: &str = "http://api.example.com/x";
const H: &str = "api.example.com";

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

// ===== hedging =====

/// Warms a host with `n` GETs of 10 ms (the first `n` calls of the API must be fast).
async fn warm<S>(svc: &S, n: usize)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone,
{
    for _ in 0..n {
        svc.clone().oneshot(req(Method::GET, U)).await.unwrap();
    }
}

/// The API: `n` fast calls (10 ms), then a slow one (5 s), then fast ones.
fn fast_then_slow(n: usize) -> Api {
    Api::new(move |i| {
        if i == n {
            Act::Ok(Duration::from_secs(5), 200)
        } else {
            Act::Ok(ms(10), 200)
        }
    })
}

/// hedge.md: "GET, HEAD and OPTIONS requests. ... Everything else passes through untouched." PUT
/// and DELETE are idempotent by RFC 9110 but not in the list: they are not hedged.
#[tokio::test(start_paused = true)]
async fn only_get_head_and_options_are_hedged() {
    for (method, hedged) in [
        (Method::GET, true),
        (Method::HEAD, true),
        (Method::OPTIONS, true),
        (Method::PUT, false),
        (Method::DELETE, false),
        (Method::PATCH, false),
        (Method::POST, false),
    ] {
        let api = fast_then_slow(20);
        let (layer, handle) = HedgeLayer::new().with_min_samples(20).pair();
        let svc = layer.layer(api.service());
        warm(&svc, 20).await;
        let start = Instant::now();
        svc.clone().oneshot(req(method.clone(), U)).await.unwrap();
        let took = start.elapsed();
        let s = handle.stats(H).unwrap();
        if hedged {
            assert_eq!(s.hedges(), 1, "{method}");
            assert!(took < ms(100), "{method}: {took:?}");
        } else {
            assert_eq!(s.hedges(), 0, "{method}");
            assert_eq!(took, Duration::from_secs(5), "{method}");
            assert_eq!(api.calls(), 21, "{method}");
            assert_eq!(s.calls(), 20, "{method}: counted as a hedgeable call");
        }
    }
}

/// `with_keyed_requests(true)`: a POST with the key is hedged, with the same key on both copies;
/// a POST without one is not. `with_idempotency_header` changes the header looked for.
#[tokio::test(start_paused = true)]
async fn keyed_requests_are_hedged_only_when_allowed_and_keep_their_key() {
    let api = fast_then_slow(20);
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(20)
        .with_keyed_requests(true)
        .pair();
    let svc = layer.layer(api.service());
    warm(&svc, 20).await;
    let mut post = req(Method::POST, U);
    post.headers_mut()
        .insert("idempotency-key", "key-1".parse().unwrap());
    let start = Instant::now();
    svc.clone().oneshot(post).await.unwrap();
    assert!(start.elapsed() < ms(100));
    assert_eq!(handle.stats(H).unwrap().hedges(), 1);
    let seen = api.seen();
    assert_eq!(seen[20].key.as_deref(), Some("key-1"));
    assert_eq!(seen[21].key.as_deref(), Some("key-1"));
    assert_eq!(seen[21].method, Method::POST);
    // Without a key: untouched.
    let before = api.calls();
    let api2 = fast_then_slow(20);
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(20)
        .with_keyed_requests(true)
        .pair();
    let svc = layer.layer(api2.service());
    warm(&svc, 20).await;
    let start = Instant::now();
    svc.clone().oneshot(req(Method::POST, U)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(handle.stats(H).unwrap().hedges(), 0);
    let _ = before;
    // Another header name.
    let api3 = fast_then_slow(20);
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(20)
        .with_keyed_requests(true)
        .with_idempotency_header(http::HeaderName::from_static("x-request-key"))
        .pair();
    let svc = layer.layer(api3.service());
    warm(&svc, 20).await;
    let mut post = req(Method::POST, U);
    post.headers_mut()
        .insert("x-request-key", "key-2".parse().unwrap());
    let start = Instant::now();
    svc.clone().oneshot(post).await.unwrap();
    assert!(start.elapsed() < ms(100));
    assert_eq!(handle.stats(H).unwrap().hedges(), 1);
}

/// hedge.md: "the second copy is a clone of the request, headers and extensions included".
#[tokio::test(start_paused = true)]
async fn the_second_copy_carries_the_extensions_and_the_uri() {
    let api = fast_then_slow(20);
    let (layer, handle) = HedgeLayer::new().with_min_samples(20).pair();
    let svc = layer.layer(api.service());
    warm(&svc, 20).await;
    let mut r = req(Method::GET, "http://api.example.com/x?q=1&r=%20");
    r.extensions_mut().insert(Tag(7));
    svc.clone().oneshot(r).await.unwrap();
    assert_eq!(handle.stats(H).unwrap().hedges(), 1);
    let seen = api.seen();
    assert_eq!(seen[21].tag, Some(Tag(7)));
    assert_eq!(seen[21].uri, "http://api.example.com/x?q=1&r=%20");
}

/// lib.rs of sturdy-hedge: "When both fail, the call fails with the later error, unless that one
/// says the request was never sent (a refused connection) while the earlier one may have been
/// processed (a reset after the request was written): then with the earlier one".
#[tokio::test(start_paused = true)]
async fn both_copies_failing_never_claim_not_sent_when_one_may_have_been_processed() {
    let api = Api::new(|i| match i {
        0..20 => Act::Ok(ms(10), 200),
        // The first copy: reset after 30 ms (after the hedge was sent).
        20 => Act::Fail(ms(30), std::io::ErrorKind::ConnectionReset),
        // The hedge: refused, later (40 ms after it was sent).
        _ => Act::Fail(ms(40), std::io::ErrorKind::ConnectionRefused),
    });
    let (layer, handle) = HedgeLayer::new().with_min_samples(20).pair();
    let svc = layer.layer(api.service());
    warm(&svc, 20).await;
    let err = svc.clone().oneshot(req(Method::GET, U)).await.unwrap_err();
    assert_eq!(handle.stats(H).unwrap().hedges(), 1);
    assert_eq!(api.calls(), 22);
    assert_eq!(
        classify::delivery(&*err),
        Delivery::MaybeProcessed,
        "{err}: a copy was reset after it was sent"
    );
}

/// hedge.md: "Failed calls are not recorded." A host whose calls all fail has no samples and no
/// delay, so nothing is hedged.
#[tokio::test(start_paused = true)]
async fn failed_calls_are_not_recorded() {
    let api = Api::new(|_| Act::Fail(ms(10), std::io::ErrorKind::ConnectionReset));
    let (layer, handle) = HedgeLayer::new().with_min_samples(20).pair();
    let svc = layer.layer(api.service());
    for _ in 0..50 {
        let _ = svc.clone().oneshot(req(Method::GET, U)).await;
    }
    let s = handle.stats(H).unwrap();
    assert_eq!(s.samples(), 0);
    assert_eq!(s.delay(), None);
    assert_eq!(s.hedges(), 0);
    assert_eq!(s.calls(), 50);
}

/// `with_delay_bounds`: "A `max` below `min` is taken as `min`." The delay is then `min`, and
/// `with_window(ZERO)` "is taken as 1 ms" (no panic, calls work).
#[tokio::test(start_paused = true)]
async fn odd_delay_bounds_and_window_are_taken_into_range() {
    let api = Api::new(|_| Act::Ok(ms(10), 200));
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(20)
        .with_delay_bounds(ms(50), ms(1))
        .pair();
    let svc = layer.layer(api.service());
    warm(&svc, 30).await;
    assert_eq!(handle.stats(H).unwrap().delay(), Some(ms(50)));
    // The bounds are both huge: the delay is capped at the max, which is the min.
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(20)
        .with_delay_bounds(Duration::MAX, Duration::ZERO)
        .pair();
    let svc = layer.layer(api.service());
    warm(&svc, 30).await;
    let d = handle.stats(H).unwrap().delay();
    eprintln!("bounds (MAX, 0): delay {d:?}");
    // A window of zero.
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(5)
        .with_window(Duration::ZERO)
        .pair();
    let svc = layer.layer(api.service());
    warm(&svc, 30).await;
    assert!(handle.stats(H).is_some());
}

/// `with_percentile` and `with_budget` are validated: NaN and infinities are errors too.
#[test]
fn hedge_settings_reject_nan_and_infinities() {
    for p in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, 1.0, -0.5] {
        assert!(
            HedgeLayer::new().with_percentile(p).is_err(),
            "percentile {p}"
        );
    }
    for r in [f64::NAN, f64::INFINITY, -0.01, 1.01] {
        assert!(HedgeLayer::new().with_budget(r, 10).is_err(), "ratio {r}");
    }
    assert!(HedgeLayer::new().with_budget(0.0, 0).is_ok());
    assert!(HedgeLayer::new().with_budget(1.0, u32::MAX).is_ok());
    for r in [f64::NAN, f64::INFINITY, 0.0, 1.0, -1.0] {
        assert!(
            AdaptiveConcurrencyLayer::new().with_backoff(r).is_err(),
            "backoff {r}"
        );
    }
}

/// HedgeLayer's rustdoc: "A setter called after a clone or a handle was taken applies to all of
/// them": a handle taken first reads the figures of the layer configured after it.
#[tokio::test(start_paused = true)]
async fn a_handle_taken_before_a_setter_reads_the_configured_layer() {
    let api = fast_then_slow(20);
    let (layer, handle) = HedgeLayer::new().pair();
    let layer = layer.with_min_samples(20);
    let svc = layer.layer(api.service());
    warm(&svc, 20).await;
    svc.clone().oneshot(req(Method::GET, U)).await.unwrap();
    let s = handle
        .stats(H)
        .expect("the handle sees the hosts of the configured layer");
    assert_eq!((s.calls(), s.hedges()), (21, 1));
}

/// "the inner service's errors are returned as they are, boxed: the service's error type is
/// `BoxError`" (hedge.md, Errors).
#[test]
fn the_hedge_service_error_type_is_box_error() {
    fn error_type<S: Service<Request<()>>>(_: &S) -> &'static str {
        std::any::type_name::<S::Error>()
    }
    let inner = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, std::convert::Infallible>(Response::new(()))
    });
    let hedged = HedgeLayer::new().layer(inner);
    assert_eq!(
        error_type(&hedged),
        std::any::type_name::<tower::BoxError>()
    );
}

/// Hedge under `Buffer(1)` over `ConcurrencyLimit(1)`, a kept service, hedges due on most calls:
/// no deadlock, every call answers.
#[tokio::test(start_paused = true)]
async fn a_kept_hedge_service_over_a_buffer_and_a_limit_of_one_does_not_deadlock() {
    let api = Api::new(|i| {
        if i < 20 || i % 3 != 0 {
            Act::Ok(ms(10), 200)
        } else {
            Act::Ok(ms(500), 200)
        }
    });
    let (layer, _handle) = HedgeLayer::new().with_min_samples(20).pair();
    let mut svc = tower::ServiceBuilder::new()
        .buffer(1)
        .layer(layer)
        .concurrency_limit(1)
        .service(api.service());
    for _ in 0..60 {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            svc.ready().await.unwrap().call(req(Method::GET, U)),
        )
        .await
        .expect("a kept call hung");
        r.unwrap();
    }
    assert!(api.peak.load(Ordering::SeqCst) <= 1);
}

// ===== adaptive concurrency =====

/// concurrency.md: "When the limit goes down while calls are in flight, their permits are
/// retired as they come back; when it goes up again first, the retirement is cancelled, not paid
/// twice."
#[tokio::test(start_paused = true)]
async fn a_limit_lowered_then_raised_before_the_calls_return_is_not_paid_twice() {
    let api = Api::new(|i| {
        if i < 4 {
            Act::Ok(ms(100), 200)
        } else {
            Act::Ok(ms(10), 200)
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(4)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = layer.layer(api.service());
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(tokio::spawn(svc.clone().oneshot(req(Method::GET, U))));
    }
    settle().await;
    assert_eq!(handle.state(H).unwrap().in_flight(), 4);
    handle.set_limit(H, 2);
    handle.set_limit(H, 4);
    for t in first {
        t.await.unwrap().unwrap();
    }
    let s = handle.state(H).unwrap();
    assert_eq!((s.limit(), s.in_flight()), (4, 0));
    // Four at once fit again.
    let mut again = Vec::new();
    for _ in 0..4 {
        again.push(tokio::spawn(svc.clone().oneshot(req(Method::GET, U))));
    }
    for t in again {
        t.await
            .unwrap()
            .expect("a limit of 4 with nothing in flight admits 4");
    }
}

/// The other half: lowered while four are in flight, the limit of 2 holds once they are back.
#[tokio::test(start_paused = true)]
async fn a_limit_lowered_while_calls_are_in_flight_holds_once_they_return() {
    let api = Api::new(|i| {
        if i < 4 {
            Act::Ok(ms(100), 200)
        } else {
            Act::Ok(ms(50), 200)
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(4)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = layer.layer(api.service());
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(tokio::spawn(svc.clone().oneshot(req(Method::GET, U))));
    }
    settle().await;
    handle.set_limit(H, 2);
    // While they are in flight, a new call is refused.
    assert!(svc.clone().oneshot(req(Method::GET, U)).await.is_err());
    for t in first {
        t.await.unwrap().unwrap();
    }
    // The four successes may have grown it a little (AIMD: they were admitted with the limit in
    // use); whatever it is now, it holds.
    let l = handle.limit(H).unwrap();
    assert!((2..4).contains(&l), "{l}");
    let mut again = Vec::new();
    for _ in 0..l + 1 {
        again.push(tokio::spawn(svc.clone().oneshot(req(Method::GET, U))));
    }
    let mut ok = 0;
    for t in again {
        if t.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, l, "a limit of {l}");
}

/// "A call that finds its host's limit full waits in line (first come, first served)".
#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_come_first_served() {
    let api = Api::new(|_| Act::Ok(ms(10), 200));
    let (layer, _handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let svc = layer.layer(api.service());
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut r = req(Method::GET, U);
        r.extensions_mut().insert(Tag(i));
        tasks.push(tokio::spawn(svc.clone().oneshot(r)));
        settle().await;
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let order: Vec<u32> = api
        .seen()
        .iter()
        .map(|s| s.tag.clone().unwrap().0)
        .collect();
    assert_eq!(order, (0..8).collect::<Vec<_>>());
}

/// "Past the wait, the call fails without being sent: a `sturdy_core::Error` of kind
/// `RateLimited` (no wait given), delivery `NotSent`, whose source is `LimitReached` (the key, the
/// limit, how long it waited)."
#[tokio::test(start_paused = true)]
async fn the_refusal_says_key_limit_and_wait() {
    let api = Api::new(|_| Act::Ok(Duration::from_secs(60), 200));
    let (layer, _handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(2, 2)
        .with_max_wait(ms(250))
        .pair();
    let svc = layer.layer(api.service());
    let _a = tokio::spawn(svc.clone().oneshot(req(Method::GET, U)));
    let _b = tokio::spawn(svc.clone().oneshot(req(Method::GET, U)));
    settle().await;
    let start = Instant::now();
    let err = svc.clone().oneshot(req(Method::POST, U)).await.unwrap_err();
    assert_eq!(start.elapsed(), ms(250));
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a sturdy error");
    assert!(
        matches!(e.kind(), ErrorKind::RateLimited { retry_after: None }),
        "{:?}",
        e.kind()
    );
    assert!(e.is_retryable());
    assert_eq!(classify::delivery(&*err), Delivery::NotSent);
    let reached = find::<LimitReached>(&*err).expect("LimitReached in the chain");
    assert_eq!(reached.key(), H);
    assert_eq!(reached.limit(), 2);
    assert_eq!(reached.waited(), ms(250));
    let words = err.to_string();
    eprintln!("refusal: {words}");
    assert!(words.contains(H), "{words}");
    assert!(!words.contains("not sent") || !words.contains("was sent"));
    assert_eq!(api.calls(), 2);
}

/// `with_limits`: "both are capped at 1,000,000"; `set_limit`: "taken into the bounds";
/// `with_initial_limit`: "taken into the bounds".
#[tokio::test(start_paused = true)]
async fn limits_are_taken_into_their_bounds() {
    let api = Api::new(|_| Act::Ok(ms(1), 200));
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(0, usize::MAX)
        .with_initial_limit(usize::MAX)
        .pair();
    let svc = layer.layer(api.service());
    svc.clone().oneshot(req(Method::GET, U)).await.unwrap();
    assert_eq!(handle.limit(H), Some(1_000_000));
    handle.set_limit(H, usize::MAX);
    assert_eq!(handle.limit(H), Some(1_000_000));
    handle.set_limit(H, 0);
    assert_eq!(handle.limit(H), Some(1));
    svc.clone().oneshot(req(Method::GET, U)).await.unwrap();

    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(2, 10)
        .with_initial_limit(50)
        .pair();
    let svc = layer.layer(api.service());
    svc.clone().oneshot(req(Method::GET, U)).await.unwrap();
    assert_eq!(handle.limit(H), Some(10));
    handle.set_limit(H, 1);
    assert_eq!(handle.limit(H), Some(2));
    // set_limit on a host never seen.
    handle.set_limit("other.example.com", 7);
    assert_eq!(handle.limit("other.example.com"), Some(7));
}

/// "Per host ... at most 1,024 hosts (`.with_max_hosts(n)`); a host with nothing in flight and
/// nobody waiting may be forgotten past the bound, and starts again from the initial limit." A
/// host with calls in flight is not forgotten: its calls still count against its limit.
#[tokio::test(start_paused = true)]
async fn a_host_with_calls_in_flight_keeps_its_count_past_the_host_bound() {
    let api = Api::new(|i| {
        if i == 0 {
            Act::Ok(Duration::from_secs(60), 200)
        } else {
            Act::Ok(ms(1), 200)
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .with_max_hosts(2)
        .pair();
    let svc = layer.layer(api.service());
    let _busy = tokio::spawn(
        svc.clone()
            .oneshot(req(Method::GET, "http://a.example.com/")),
    );
    settle().await;
    for h in ["b", "c", "d", "e", "f"] {
        svc.clone()
            .oneshot(req(Method::GET, &format!("http://{h}.example.com/")))
            .await
            .unwrap();
    }
    let r = svc
        .clone()
        .oneshot(req(Method::GET, "http://a.example.com/"))
        .await;
    assert!(
        r.is_err(),
        "host a had a call in flight at a limit of 1; a second was let through"
    );
    assert!(handle.states().len() <= 3, "{:?}", handle.states().len());
}

/// A forgotten host "starts again from the initial limit".
#[tokio::test(start_paused = true)]
async fn a_forgotten_host_starts_again_from_the_initial_limit() {
    let api = Api::new(|_| Act::Ok(ms(1), 200));
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(20)
        .with_max_hosts(2)
        .pair();
    let svc = layer.layer(api.service());
    svc.clone()
        .oneshot(req(Method::GET, "http://a.example.com/"))
        .await
        .unwrap();
    handle.set_limit("a.example.com", 5);
    for h in ["b", "c", "d", "e"] {
        svc.clone()
            .oneshot(req(Method::GET, &format!("http://{h}.example.com/")))
            .await
            .unwrap();
    }
    svc.clone()
        .oneshot(req(Method::GET, "http://a.example.com/"))
        .await
        .unwrap();
    let l = handle.limit("a.example.com");
    assert!(l == Some(5) || l == Some(20) || l.is_none(), "{l:?}");
}

/// concurrency.md: overload signals are "a 429, a 503, a 504 or a timeout (the kinds
/// `RateLimited`, `Timeout` and `Server(503 | 504)`)"; "Other failures (a 500, a 404, a connect
/// error) and dropped calls say nothing about capacity and are ignored."
#[tokio::test(start_paused = true)]
async fn which_outcomes_lower_the_limit() {
    let cases: Vec<(&str, Act, bool)> = vec![
        ("429", Act::Ok(ms(5), 429), true),
        ("503", Act::Ok(ms(5), 503), true),
        ("504", Act::Ok(ms(5), 504), true),
        ("timeout error", Act::Sturdy(ms(5), "timeout"), true),
        (
            "io timeout",
            Act::Fail(ms(5), std::io::ErrorKind::TimedOut),
            true,
        ),
        ("500", Act::Ok(ms(5), 500), false),
        ("502", Act::Ok(ms(5), 502), false),
        ("404", Act::Ok(ms(5), 404), false),
        (
            "refused",
            Act::Fail(ms(5), std::io::ErrorKind::ConnectionRefused),
            false,
        ),
    ];
    for (name, act, lowers) in cases {
        let api = Api::new(move |_| act);
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_initial_limit(20)
            .pair();
        let svc = layer.layer(api.service());
        let _ = svc.clone().oneshot(req(Method::GET, U)).await;
        let l = handle.limit(H).unwrap();
        if lowers {
            assert_eq!(l, 18, "{name}: 20 × 0.9");
        } else {
            assert_eq!(l, 20, "{name}");
        }
    }
    // A dropped call says nothing.
    let api = Api::new(|_| Act::Ok(Duration::from_secs(10), 503));
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(20)
        .pair();
    let svc = layer.layer(api.service());
    let _ = tokio::time::timeout(ms(10), svc.clone().oneshot(req(Method::GET, U))).await;
    assert_eq!(handle.limit(H), Some(20));
    assert_eq!(handle.state(H).unwrap().in_flight(), 0);
}

/// AIMD: "each success adds `1 / limit` while at least half of the limit was in use when the
/// call was admitted, so the limit ... does not grow while unused".
#[tokio::test(start_paused = true)]
async fn aimd_does_not_grow_while_unused_and_grows_under_load() {
    let api = Api::new(|_| Act::Ok(ms(10), 200));
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(20)
        .pair();
    let svc = layer.layer(api.service());
    for _ in 0..500 {
        svc.clone().oneshot(req(Method::GET, U)).await.unwrap();
    }
    assert_eq!(handle.limit(H), Some(20), "grew while unused");
    // 60 callers looping for ten round trips of 10 ms: the limit is full all along, so it
    // grows by about one per round trip.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..60 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < ms(100) {
                svc.clone().oneshot(req(Method::GET, U)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let l = handle.limit(H).unwrap();
    assert!((27..=32).contains(&l), "{l}");
}

/// The layer's service is `Clone + Send + Sync`, and a kept service under `Buffer(1)` over
/// `ConcurrencyLimit(1)` with a tight adaptive limit and waiting does not deadlock.
#[tokio::test(start_paused = true)]
async fn a_kept_adaptive_service_under_buffer_and_a_limit_of_one_does_not_deadlock() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>(_: &T) {}
    let api = Api::new(|i| {
        if i % 5 == 0 {
            Act::Ok(ms(20), 503)
        } else {
            Act::Ok(ms(20), 200)
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let inner = layer.layer(api.service());
    assert_send_sync_clone(&inner);
    let mut svc = tower::ServiceBuilder::new()
        .buffer(1)
        .concurrency_limit(1)
        .service(inner);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                s.ready()
                    .await
                    .unwrap()
                    .call(req(Method::GET, U))
                    .await
                    .unwrap();
            }
        }));
    }
    for _ in 0..10 {
        let _ =
            tokio::time::timeout(ms(5), svc.ready().await.unwrap().call(req(Method::GET, U))).await;
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a kept caller hung")
            .unwrap();
    }
    let s = handle.state(H).unwrap();
    assert_eq!((s.in_flight(), s.waiting()), (0, 0));
}

/// Host bounds of zero and keys of hostile size: nothing panics, calls go through, and the
/// budget of `with_budget(0.0, 0)` never sends a hedge ("hedges stay below ratio × calls +
/// burst").
#[tokio::test(start_paused = true)]
async fn zero_host_bounds_huge_keys_and_an_empty_budget() {
    let api = fast_then_slow(30);
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(20)
        .with_max_hosts(0)
        .with_budget(0.0, 0)
        .unwrap()
        .pair();
    let svc = layer.layer(api.service());
    warm(&svc, 30).await;
    let start = Instant::now();
    svc.clone().oneshot(req(Method::GET, U)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert!(handle.all().iter().all(|(_, s)| s.hedges() == 0));

    let api = Api::new(|_| Act::Ok(ms(1), 200));
    let big = "k".repeat(1 << 20);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_max_hosts(0)
        .with_key(move |_req: &Request<Body>| big.clone())
        .pair();
    let svc = layer.layer(api.service());
    for _ in 0..20 {
        svc.clone().oneshot(req(Method::GET, U)).await.unwrap();
    }
    let _ = handle.states();
    let api = Api::new(|_| Act::Ok(ms(1), 200));
    let (layer, _handle) = HedgeLayer::new()
        .with_max_hosts(0)
        .with_key(|req: &Request<Body>| req.uri().path().repeat(10_000))
        .pair();
    let svc = layer.layer(api.service());
    for i in 0..50 {
        svc.clone()
            .oneshot(req(Method::GET, &format!("http://api.example.com/p{i}")))
            .await
            .unwrap();
    }
}
