//! The rate limiter, hedging and the adaptive concurrency limit inside the composed
//! `ClientBuilder` stack: its documented type, retries of refusals, deadlines, composition under
//! tower's layers, and cancellation.

#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::{BoxError, CallOptions, Delivery, RateLimited};
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::{Client, ClientBuilder};
use tokio::time::Instant;
use tower::{service_fn, Service, ServiceExt};

type Body = Full<Bytes>;

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::default()).unwrap()
}

/// An HTTP stand-in: each call waits `ms(i)` and answers `status(i)` (with `retry-after` when
/// given); counts calls and those in flight.
#[derive(Clone)]
struct Http {
    calls: Arc<AtomicUsize>,
    now: Arc<AtomicUsize>,
    #[allow(clippy::type_complexity)]
    script: Arc<dyn Fn(usize) -> (u64, u16, Option<&'static str>) + Send + Sync>,
}

impl Http {
    fn new(
        script: impl Fn(usize) -> (u64, u16, Option<&'static str>) + Send + Sync + 'static,
    ) -> Self {
        Self {
            calls: Arc::default(),
            now: Arc::default(),
            script: Arc::new(script),
        }
    }

    fn service(
        &self,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future = impl Send>
           + Clone
           + Send
           + Sync
           + 'static {
        let h = self.clone();
        service_fn(move |_r: Request<Body>| {
            let i = h.calls.fetch_add(1, Ordering::SeqCst);
            let (ms, status, ra) = (h.script)(i);
            let now = h.now.clone();
            now.fetch_add(1, Ordering::SeqCst);
            struct Out(Arc<AtomicUsize>);
            impl Drop for Out {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let out = Out(now);
            async move {
                let _out = out;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let mut b = Response::builder().status(status);
                if let Some(ra) = ra {
                    b = b.header("retry-after", ra);
                }
                Ok::<_, BoxError>(b.body(Body::default()).unwrap())
            }
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn in_flight(&self) -> usize {
        self.now.load(Ordering::SeqCst)
    }
}

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>(_: &T) {}

#[tokio::test(start_paused = true)]
async fn the_full_client_is_send_sync_clone() {
    let http = Http::new(|_| (1, 200, None));
    let client: Client<Body> = ClientBuilder::new()
        .with_hedge(HedgeLayer::new())
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_rate_limit(RateLimitLayer::new(Quota::per_second(100).unwrap()))
        .build(http.service());
    assert_send_sync_clone(&client);
    let shared = Arc::new(client);
    let s = shared.clone();
    tokio::spawn(async move { (*s).clone().oneshot(get("http://a.test/")).await.unwrap() })
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_refusal_with_zero_max_wait_is_retried_after_its_wait() {
    let http = Http::new(|_| (0, 200, None));
    let client = ClientBuilder::new()
        .with_rate_limit(
            RateLimitLayer::new(Quota::per_second(1).unwrap()).with_max_wait(Duration::ZERO),
        )
        .build(http.service());
    client.clone().oneshot(get("http://a.test/")).await.unwrap();
    let start = Instant::now();
    client.clone().oneshot(get("http://a.test/")).await.unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took <= Duration::from_millis(1_300),
        "slept in the retry layer: {took:?}"
    );
    assert_eq!(http.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_longer_than_max_retry_after_fails_at_once() {
    let http = Http::new(|_| (0, 200, None));
    let client = ClientBuilder::new()
        .with_rate_limit(
            RateLimitLayer::new(Quota::new(1, Duration::from_secs(120)).unwrap())
                .with_max_wait(Duration::ZERO),
        )
        .build(http.service());
    client.clone().oneshot(get("http://a.test/")).await.unwrap();
    let start = Instant::now();
    let err = client
        .clone()
        .oneshot(get("http://a.test/"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited");
    assert_eq!(rl.retry_after(), Duration::from_secs(120));
    assert!(err.to_string().contains("retry after 2m"), "{err}");
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
}

#[tokio::test(start_paused = true)]
async fn a_turn_after_the_deadline_is_refused_at_once_not_sent() {
    let http = Http::new(|_| (0, 200, None));
    let client = ClientBuilder::new()
        .with_rate_limit(RateLimitLayer::new(
            Quota::new(1, Duration::from_secs(10)).unwrap(),
        ))
        .build(http.service());
    client.clone().oneshot(get("http://a.test/")).await.unwrap();
    let mut req = get("http://a.test/");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(2)));
    let start = Instant::now();
    let err = client.clone().oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "{err}");
    assert!(sturdy::core::find::<RateLimited>(&*err).is_some(), "{err}");
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    assert_eq!(http.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hostile_retry_after_through_the_client_says_five_minutes() {
    let http = Http::new(|_| (0, 429, Some("99999999999999999999")));
    let client = ClientBuilder::new().build(http.service());
    let err = client
        .clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("retry after 5m"), "{text}");
    assert!(!text.contains("5124095"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_full_limit_in_the_client_names_host_and_limit() {
    let http = Http::new(|_| (1_000, 200, None));
    let client = ClientBuilder::new()
        .without_retry()
        .with_adaptive_concurrency(
            AdaptiveConcurrencyLayer::new()
                .with_limits(1, 1)
                .with_max_wait(Duration::ZERO),
        )
        .build(http.service());
    let first = tokio::spawn(client.clone().oneshot(get("http://a.test:81/")));
    tokio::task::yield_now().await;
    let err = client
        .clone()
        .oneshot(get("http://a.test:81/"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("a.test:81"), "names the host: {text}");
    assert!(text.contains("limit"), "names the limit: {text}");
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    first.await.unwrap().unwrap();
}

/// The whole stack, kept and driven with `ready().call()` from many tasks, under `Buffer` and
/// over a `ConcurrencyLimit(1)` HTTP client, with a `Timeout` above.
#[tokio::test(start_paused = true)]
async fn full_stack_under_buffer_over_concurrency_limit_1_many_tasks() {
    let http = Http::new(|i| (if i % 13 == 12 { 200 } else { 5 }, 200, None));
    let (cl, chandle) = AdaptiveConcurrencyLayer::new().pair();
    let (rl, rhandle) = RateLimitLayer::new(Quota::per_second(200).unwrap()).pair();
    let inner = tower::ServiceBuilder::new()
        .concurrency_limit(1)
        .service(http.service());
    let client = ClientBuilder::new()
        .with_hedge(HedgeLayer::new().with_min_samples(10))
        .with_adaptive_concurrency(cl)
        .with_rate_limit(rl)
        .build(inner);
    let svc = tower::ServiceBuilder::new()
        .timeout(Duration::from_secs(30))
        .service(tower::buffer::Buffer::new(client, 8));
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let mut s = svc.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    s.ready()
                        .await
                        .unwrap()
                        .call(get("http://a.test/"))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    tokio::time::timeout(
        Duration::from_secs(600),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("no deadlock");
    assert_eq!(chandle.state("a.test").unwrap().in_flight(), 0);
    assert_eq!(rhandle.waiting("a.test"), 0);
    assert_eq!(http.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn aborted_callers_waiting_out_a_pause_leave_no_trace() {
    let http = Http::new(|i| {
        if i == 0 {
            (0, 429, Some("30"))
        } else {
            (10, 200, None)
        }
    });
    let (rl, rhandle) = RateLimitLayer::adaptive_only().pair();
    let (cl, chandle) = AdaptiveConcurrencyLayer::new().pair();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .with_adaptive_concurrency(cl)
        .build(http.service());
    let mut once = get("http://a.test/");
    once.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let _ = client.clone().oneshot(once).await;
    assert!(rhandle.pause("a.test").is_some());
    let waiters: Vec<_> = (0..50)
        .map(|_| tokio::spawn(client.clone().oneshot(get("http://a.test/"))))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rhandle.waiting("a.test"), 50);
    for w in &waiters {
        w.abort();
    }
    for w in waiters {
        let _ = w.await;
    }
    assert_eq!(rhandle.waiting("a.test"), 0);
    assert_eq!(chandle.state("a.test").map_or(0, |s| s.in_flight()), 0);
    assert_eq!(http.calls(), 1, "none was sent");
    rhandle.clear_pause("a.test");
    client.clone().oneshot(get("http://a.test/")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_hedged_call_aborted_in_the_client_gives_every_place_back() {
    let http = Http::new(|i| (if i >= 10 { 5_000 } else { 10 }, 200, None));
    let (cl, chandle) = AdaptiveConcurrencyLayer::new().pair();
    let (hl, hhandle) = HedgeLayer::new().with_min_samples(10).pair();
    let client = ClientBuilder::new()
        .with_hedge(hl)
        .with_adaptive_concurrency(cl)
        .build(http.service());
    for _ in 0..10 {
        client.clone().oneshot(get("http://a.test/")).await.unwrap();
    }
    let call = tokio::spawn(client.clone().oneshot(get("http://a.test/")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(hhandle.stats("a.test").unwrap().hedges(), 1);
    assert_eq!(chandle.state("a.test").unwrap().in_flight(), 2);
    call.abort();
    let _ = call.await;
    assert_eq!(chandle.state("a.test").unwrap().in_flight(), 0);
    assert_eq!(http.in_flight(), 0, "both copies were cancelled");
}

#[tokio::test(start_paused = true)]
async fn client_ready_but_never_called_holds_nothing() {
    let http = Http::new(|_| (0, 200, None));
    let client = ClientBuilder::new()
        .with_adaptive_concurrency(
            AdaptiveConcurrencyLayer::new()
                .with_limits(1, 1)
                .with_max_wait(Duration::ZERO),
        )
        .with_rate_limit(
            RateLimitLayer::new(Quota::per_second(1).unwrap()).with_max_wait(Duration::ZERO),
        )
        .without_retry()
        .build(http.service());
    let mut idle: Vec<_> = (0..10).map(|_| client.clone()).collect();
    for s in &mut idle {
        ServiceExt::<Request<Body>>::ready(s).await.unwrap();
    }
    client.clone().oneshot(get("http://a.test/")).await.unwrap();
    drop(idle);
}

#[tokio::test(start_paused = true)]
async fn default_client_pauses_every_caller_on_a_429() {
    let http = Http::new(|i| {
        if i == 0 {
            (0, 429, Some("2"))
        } else {
            (0, 200, None)
        }
    });
    let client = ClientBuilder::new().build(http.service());
    let start = Instant::now();
    client.clone().oneshot(get("http://a.test/")).await.unwrap();
    let first = start.elapsed();
    assert!(
        first >= Duration::from_secs(2),
        "retried after the pause: {first:?}"
    );
    let start = Instant::now();
    client.clone().oneshot(get("http://a.test/")).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(10),
        "the pause is over"
    );
    assert_eq!(http.calls(), 3, "the 429, its retry, the second call");
}
