//! Round s50a, more of docs/guides/retry.md read literally, on paused time against in-process
//! services: per-host budgets shared by clones, the in-flight 409, "no sleep is started that
//! would end past it", the deadline abandoning an attempt, `CallOptions` per request, and the
//! key `ClientBuilder` sends being the key a failed call reports.
#![cfg(feature = "full")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::core::classify::delivery;
use sturdy::core::{find, BoxError, CallOptions, CallReport, Delivery, Error as SturdyError};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<()>;
type Api = BoxCloneSyncService<Req, Res, BoxError>;
type Seen = Arc<Mutex<Vec<(Instant, String, Option<String>)>>>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// An API answering every request with `f(n)` (None: never answers); records time, host, key.
fn api(
    f: impl Fn(usize) -> Option<(u16, Option<&'static str>)> + Send + Sync + 'static,
) -> (Api, Seen) {
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let f = Arc::new(f);
    let svc = service_fn(move |req: Req| {
        let n = {
            let mut s = s2.lock().unwrap();
            s.push((
                Instant::now(),
                req.uri().host().unwrap_or("").to_owned(),
                req.headers()
                    .get("idempotency-key")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            ));
            s.len() - 1
        };
        let a = f(n);
        async move {
            match a {
                Some((code, ra)) => {
                    let mut b = Response::builder().status(code);
                    if let Some(v) = ra {
                        b = b.header("retry-after", v);
                    }
                    Ok::<Res, BoxError>(b.body(()).unwrap())
                }
                None => std::future::pending().await,
            }
        }
    });
    (BoxCloneSyncService::new(svc), seen)
}

fn get(host: &str) -> Req {
    Request::get(format!("http://{host}/orders"))
        .body(Full::default())
        .unwrap()
}

fn tiny_backoff() -> Backoff {
    Backoff::exponential(ms(1), ms(1)).unwrap()
}

/// "Budget: one budget per host, shared by every clone": ten retries of reserve
/// (`with_budget(10 s, 1, 0.0)`) spent on one host leave another host's budget whole.
#[tokio::test(start_paused = true)]
async fn the_budget_is_per_host_and_shared_by_clones() {
    let layer = RetryLayer::new()
        .with_backoff(tiny_backoff())
        .with_budget(secs(10), 1, 0.0)
        .unwrap();
    let (svc, seen) = api(|_| Some((503, None)));
    let count = |host: &str| seen.lock().unwrap().iter().filter(|s| s.1 == host).count();
    // Each call through a new service made by the same layer (a clone of the config).
    let mut per_call = Vec::new();
    for _ in 0..6 {
        let before = count("a.example.com");
        let res = layer
            .clone()
            .layer(svc.clone())
            .oneshot(get("a.example.com"))
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
        per_call.push(count("a.example.com") - before);
    }
    let retries: usize = per_call.iter().map(|n| n - 1).sum();
    assert!((9..=11).contains(&retries), "{per_call:?}");
    assert_eq!(*per_call.last().unwrap(), 1, "{per_call:?}");
    // Another host: its own budget.
    let res = layer
        .layer(svc.clone())
        .oneshot(get("b.example.com"))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(count("b.example.com"), 4);
}

/// "A 409 that answers a request with an Idempotency-Key and carries Retry-After ... is retried
/// after the Retry-After"; one longer than 60 s "is returned as it is (the server's answer, with
/// a CallReport in its extensions)"; without a key, or without Retry-After, returned at once.
#[tokio::test(start_paused = true)]
async fn the_in_flight_409() {
    let keyed = || {
        Request::post("http://api.example.com/orders")
            .header("idempotency-key", "k1")
            .body(Full::from("{}"))
            .unwrap()
    };
    // Retried after 1 s, then 201.
    let (svc, seen) = api(|n| {
        Some(if n == 0 {
            (409, Some("1"))
        } else {
            (201, None)
        })
    });
    let res = RetryLayer::new().layer(svc).oneshot(keyed()).await.unwrap();
    assert_eq!(res.status(), 201);
    let s = seen.lock().unwrap().clone();
    assert_eq!(s.len(), 2);
    let g = s[1].0 - s[0].0;
    assert!(g >= secs(1) && g <= ms(1200), "{g:?}");

    // Retry-After 3600: returned as it is, with a CallReport.
    let (svc, seen) = api(|_| Some((409, Some("3600"))));
    let t0 = Instant::now();
    let res = RetryLayer::new().layer(svc).oneshot(keyed()).await.unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(seen.lock().unwrap().len(), 1);
    let rep = res
        .extensions()
        .get::<CallReport>()
        .expect("no CallReport in the 409's extensions");
    assert_eq!(rep.attempts(), 1);
    assert_eq!(rep.idempotency_key(), Some("k1"));

    // Last attempt answered 409 with Retry-After: returned, with a report of every attempt.
    let (svc, _) = api(|_| Some((409, Some("1"))));
    let res = RetryLayer::new().layer(svc).oneshot(keyed()).await.unwrap();
    assert_eq!(res.status(), 409);
    let rep = res.extensions().get::<CallReport>().expect("no CallReport");
    assert_eq!(rep.attempts(), 4);
    assert_eq!(rep.delivery(), Delivery::MaybeProcessed);

    // No key: a real conflict.
    let (svc, seen) = api(|_| Some((409, Some("1"))));
    let res = RetryLayer::new()
        .layer(svc)
        .oneshot(
            Request::put("http://api.example.com/orders/1")
                .body(Full::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(seen.lock().unwrap().len(), 1);
    // A key, no Retry-After: a real conflict.
    let (svc, seen) = api(|_| Some((409, None)));
    let res = RetryLayer::new().layer(svc).oneshot(keyed()).await.unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// "no sleep is started that would end past it": the call returns the last 503 as soon as the
/// next sleep would cross the deadline, not after sleeping; every attempt starts before it.
#[tokio::test(start_paused = true)]
async fn no_sleep_is_started_that_would_end_past_the_deadline() {
    for seed in 0..8 {
        let (svc, seen) = api(|_| Some((503, None)));
        let layer = RetryLayer::new()
            .with_seed(seed)
            .with_max_attempts(100)
            .without_budget()
            .with_deadline(secs(3));
        let t0 = Instant::now();
        let res = layer
            .layer(svc)
            .oneshot(get("api.example.com"))
            .await
            .unwrap();
        let took = t0.elapsed();
        assert_eq!(res.status(), 503);
        let s = seen.lock().unwrap().clone();
        let last = s.last().unwrap().0 - t0;
        assert!(took <= secs(3), "seed {seed}: {took:?}");
        assert_eq!(took, last, "seed {seed}: slept after the last attempt");
    }
}

/// "an attempt still running at the deadline is abandoned": the call ends at the deadline, as a
/// timeout that may have been processed (hold marks off), naming the cause.
#[tokio::test(start_paused = true)]
async fn an_attempt_running_at_the_deadline_is_abandoned_at_it() {
    let (svc, seen) = api(|n| if n == 0 { Some((503, None)) } else { None });
    let layer = RetryLayer::new()
        .with_seed(1)
        .with_deadline(secs(2))
        .with_attempt_timeout(secs(30));
    let t0 = Instant::now();
    let err = layer
        .layer(svc)
        .oneshot(get("api.example.com"))
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), secs(2), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 2);
    let e = find::<SturdyError>(&*err).unwrap();
    assert_eq!(*e.kind(), sturdy::core::ErrorKind::Timeout, "{err}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert_eq!(e.report().unwrap().attempts(), 2, "{err}");
    assert!(!err.to_string().contains("not sent"), "{err}");
}

/// Per request: `without_retries()` and a deadline shorter than the layer's.
#[tokio::test(start_paused = true)]
async fn call_options_override_the_layer_for_one_request() {
    let (svc, seen) = api(|_| Some((503, None)));
    let mut req = get("api.example.com");
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let res = RetryLayer::new().layer(svc).oneshot(req).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(seen.lock().unwrap().len(), 1);

    let (svc, _) = api(|_| None);
    let mut req = get("api.example.com");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(ms(300)));
    let t0 = Instant::now();
    let err = RetryLayer::new()
        .with_deadline(secs(60))
        .layer(svc)
        .oneshot(req)
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), ms(300), "{err}");
}

/// idempotency.md: "the value sent is the key a failed call reports", for keys given in
/// `CallOptions` (plain, with spaces to be hashed) through `ClientBuilder`'s default stack; every
/// attempt carries it.
#[tokio::test(start_paused = true)]
async fn the_key_sent_is_the_key_reported() {
    for key in ["order-42", " padded ", "", "a\tb", "caf\u{e9}"] {
        let (svc, seen) = api(|_| None);
        let client = ClientBuilder::new()
            .with_retry(RetryLayer::new().with_seed(3))
            .with_attempt_timeout(ms(100))
            .build(svc);
        let mut req = Request::post("http://api.example.com/orders")
            .body(Full::from("{}"))
            .unwrap();
        req.extensions_mut()
            .insert(CallOptions::new().with_idempotency_key(key));
        let err = client.oneshot(req).await.unwrap_err();
        let s = seen.lock().unwrap().clone();
        assert!(s.len() >= 2, "{key:?}: {} attempts: {err}", s.len());
        let sent: Vec<String> = s
            .iter()
            .map(|x| x.2.clone().expect("no key sent"))
            .collect();
        assert!(sent.iter().all(|k| *k == sent[0]), "{key:?}: {sent:?}");
        let e = find::<SturdyError>(&*err).unwrap();
        assert_eq!(
            e.report().unwrap().idempotency_key(),
            Some(sent[0].as_str()),
            "{key:?}: {err}"
        );
        assert_eq!(e.idempotency_key(), Some(sent[0].as_str()), "{key:?}");
        assert!(
            err.to_string()
                .ends_with(&format!("retry with the same idempotency key {}", sent[0])),
            "{key:?}: {err}"
        );
    }
}

/// A request body that yields 5 of the 10 bytes its size hint promises, then never more.
enum SlowBody {
    Stall(bool),
    Full(Option<Bytes>),
}

impl From<Bytes> for SlowBody {
    fn from(b: Bytes) -> Self {
        Self::Full(Some(b))
    }
}

impl http_body::Body for SlowBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Stall(sent) if !*sent => {
                *sent = true;
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                    b"hello",
                )))))
            }
            Self::Stall(_) => std::task::Poll::Pending,
            Self::Full(b) => {
                std::task::Poll::Ready(b.take().map(|b| Ok(http_body::Frame::data(b))))
            }
        }
    }
    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Stall(_) => http_body::SizeHint::with_exact(10),
            Self::Full(b) => {
                http_body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// "Deadline: .with_deadline(d) bounds attempts and sleeps together": a request body that stalls
/// while it is read (for the replay buffer or by the server) cannot hold the call past it.
#[tokio::test(start_paused = true)]
async fn a_stalled_request_body_cannot_hold_the_call_past_the_deadline() {
    use http_body_util::BodyExt;
    let calls = Arc::new(Mutex::new(0usize));
    let c2 = calls.clone();
    let svc = service_fn(move |req: Request<SlowBody>| {
        *c2.lock().unwrap() += 1;
        async move {
            let _ = req.into_body().collect().await;
            Ok::<Res, BoxError>(Response::new(()))
        }
    });
    let req = Request::put("http://api.example.com/x")
        .body(SlowBody::Stall(false))
        .unwrap();
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        secs(3600),
        RetryLayer::new()
            .with_deadline(secs(2))
            .layer(svc)
            .oneshot(req),
    )
    .await;
    let took = t0.elapsed();
    let r = r.unwrap_or_else(|_| panic!("the call was still running after 1 h (deadline 2 s)"));
    let err = r.expect_err("the body never ends");
    assert!(took <= secs(2), "{took:?}: {err}");
    let _ = find::<SturdyError>(&*err).map(|e| e.kind().clone());
}

/// "later attempts wait for readiness again on that same service (... no clone of the inner
/// stack holds a permit)": a call sleeping out a Retry-After over `ConcurrencyLimit(1)` holds no
/// permit, so another caller through the same `Buffer` goes at once.
#[tokio::test(start_paused = true)]
async fn a_sleeping_call_holds_no_permit_of_a_limit_below() {
    let (inner, seen) = api(|n| {
        Some(if n == 0 {
            (503, Some("10"))
        } else {
            (200, None)
        })
    });
    let svc = tower::ServiceBuilder::new()
        .buffer(4)
        .layer(RetryLayer::new().with_seed(1))
        .concurrency_limit(1)
        .service(inner);
    let mut a = svc.clone();
    let first = tokio::spawn(async move {
        use tower::Service;
        a.ready().await?.call(get("api.example.com")).await
    });
    tokio::time::sleep(ms(100)).await;
    assert_eq!(seen.lock().unwrap().len(), 1);
    let t0 = Instant::now();
    let mut b = svc.clone();
    let res = {
        use tower::Service;
        b.ready()
            .await
            .unwrap()
            .call(get("api.example.com"))
            .await
            .unwrap()
    };
    assert_eq!(res.status(), 200);
    assert!(t0.elapsed() < secs(1), "{:?}", t0.elapsed());
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
}

/// HTTP-date `Retry-After` against a wall clock of the test's choosing (`with_clock`): a date
/// 29.1 s ahead is slept 29.1 s to +20 %; any clock, even one before 1970 or far in the future,
/// gives no panic and a wait within the documented bounds.
#[tokio::test(start_paused = true)]
async fn http_date_retry_after_against_odd_wall_clocks() {
    use std::time::{SystemTime, UNIX_EPOCH};
    use sturdy::core::clock::ManualClock;
    // Sun, 06 Nov 1994 08:49:37 GMT = 784111777.
    let date = "Sun, 06 Nov 1994 08:49:37 GMT";
    let at = UNIX_EPOCH + Duration::from_millis(784_111_777_000 - 29_100);
    let (svc, seen) = api(|n| {
        Some(if n == 0 {
            (503, Some(date))
        } else {
            (200, None)
        })
    });
    let layer = RetryLayer::new()
        .with_seed(1)
        .with_clock(Arc::new(ManualClock::at(at)));
    let res = layer
        .layer(svc)
        .oneshot(get("api.example.com"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let s = seen.lock().unwrap().clone();
    let g = s[1].0 - s[0].0;
    assert!(g >= ms(29_100) && g <= ms(34_920), "{g:?}");

    for (clock, expect_fail) in [
        (UNIX_EPOCH - secs(86_400 * 1000), true),
        (UNIX_EPOCH + secs(86_400 * 365 * 30_000), false),
        (SystemTime::UNIX_EPOCH, true),
    ] {
        let (svc, seen) = api(|n| {
            Some(if n == 0 {
                (429, Some(date))
            } else {
                (200, None)
            })
        });
        let layer = RetryLayer::new()
            .with_seed(1)
            .with_clock(Arc::new(ManualClock::at(clock)));
        let t0 = Instant::now();
        let r = layer.layer(svc).oneshot(get("api.example.com")).await;
        if expect_fail {
            let err = r.unwrap_err();
            let w = find::<sturdy::core::RateLimited>(&*err)
                .unwrap()
                .retry_after();
            assert!(w > secs(60) && w <= secs(300), "{clock:?}: {w:?}");
            assert_eq!(t0.elapsed(), Duration::ZERO);
        } else {
            assert_eq!(r.unwrap().status(), 200);
            let s = seen.lock().unwrap().clone();
            assert!(
                s[1].0 - s[0].0 <= ms(50),
                "{clock:?}: {:?}",
                s[1].0 - s[0].0
            );
        }
    }
}

/// Found a fault in round s50a (fixed): "Attempt timeout: a timeout for each attempt": a request body that stalls cannot hold one
/// attempt past it either (no deadline set).
#[tokio::test(start_paused = true)]
async fn fault_a_stalled_request_body_cannot_hold_an_attempt_past_its_timeout() {
    use http_body_util::BodyExt;
    let calls = Arc::new(Mutex::new(0usize));
    let c2 = calls.clone();
    let svc = service_fn(move |req: Request<SlowBody>| {
        *c2.lock().unwrap() += 1;
        async move {
            let _ = req.into_body().collect().await;
            Ok::<Res, BoxError>(Response::new(()))
        }
    });
    let req = Request::put("http://api.example.com/x")
        .body(SlowBody::Stall(false))
        .unwrap();
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        secs(3600),
        RetryLayer::new()
            .with_seed(1)
            .with_attempt_timeout(secs(1))
            .layer(svc)
            .oneshot(req),
    )
    .await;
    let took = t0.elapsed();
    let r = r.unwrap_or_else(|_| {
        panic!(
            "FAULT: the call was still running after 1 h (attempt timeout 1 s); the inner \
             service was called {} times",
            calls.lock().unwrap()
        )
    });
    let err = r.expect_err("the body never ends");
    // One attempt (a body that never ended cannot be replayed) or four with sleeps.
    assert!(took <= secs(12), "{took:?}: {err}");
}
