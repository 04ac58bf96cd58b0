//! Hedging on paused time, against in-process services and tower-test mocks.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use std::future::Future;
use sturdy_core::BoxError;
use sturdy_hedge::{Hedge, HedgeLayer, ResponseFuture};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::limit::ConcurrencyLimitLayer;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

const HOST: &str = "api.example.com";

fn req(method: Method) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(format!("http://{HOST}/orders/1"))
        .body(())
        .unwrap()
}

fn get() -> Request<()> {
    req(Method::GET)
}

/// Counts live futures of the service, to see that a loser is cancelled.
struct Live(Arc<AtomicUsize>);
impl Live {
    fn new(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Self(c.clone())
    }
}
impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A service whose n-th call (0-based) takes `latency(n)`; the response says which call answered.
#[derive(Clone)]
struct Api {
    calls: Arc<AtomicU32>,
    live: Arc<AtomicUsize>,
    latency: Arc<dyn Fn(u32) -> Result<Duration, Duration> + Send + Sync>,
}

impl Api {
    /// `Ok(d)`: answer 200 after `d`; `Err(d)`: fail after `d`.
    fn new(latency: impl Fn(u32) -> Result<Duration, Duration> + Send + Sync + 'static) -> Self {
        Self {
            calls: Arc::default(),
            live: Arc::default(),
            latency: Arc::new(latency),
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<()>> for Api {
    type Response = Response<u32>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<u32>, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let live = Live::new(&self.live);
        let outcome = (self.latency)(n);
        Box::pin(async move {
            let _live = live;
            match outcome {
                Ok(d) => {
                    tokio::time::sleep(d).await;
                    Ok(Response::new(n))
                }
                Err(d) => {
                    tokio::time::sleep(d).await;
                    Err("connection reset".into())
                }
            }
        })
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Warms the host's histogram with `n` calls.
async fn warm<S>(client: &S, n: usize)
where
    S: Service<Request<()>> + Clone,
    S::Error: std::fmt::Debug,
{
    for _ in 0..n {
        client.clone().oneshot(get()).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_is_hedged_after_the_percentile_and_the_loser_is_cancelled() {
    let api = Api::new(|n| Ok(if n == 120 { ms(1_000) } else { ms(10) }));
    let (layer, handle) = HedgeLayer::new().pair();
    let client = layer.layer(api.clone());
    warm(&client, 120).await;
    assert_eq!(
        handle.stats(HOST).unwrap().hedges(),
        0,
        "fast calls are not hedged"
    );
    let d = handle.stats(HOST).unwrap().delay().unwrap();
    assert!(d >= ms(10) && d < Duration::from_micros(10_250), "{d:?}");

    let start = Instant::now();
    let res = client.clone().oneshot(get()).await.unwrap();
    // The copy (call 121) answered at delay + 10 ms (timers tick in whole milliseconds); the
    // first copy (call 120) was dropped.
    assert_eq!(*res.body(), 121);
    let took = start.elapsed();
    assert!(took >= d + ms(10) && took <= d + ms(11), "{took:?}");
    assert_eq!(
        api.live.load(Ordering::SeqCst),
        0,
        "the slow copy was cancelled"
    );
    let s = handle.stats(HOST).unwrap();
    assert_eq!((s.calls(), s.hedges(), s.hedge_wins()), (121, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn the_first_copy_wins_when_it_answers_first() {
    // Call 100 takes 15 ms: hedged at ~10 ms, its copy would take 10 ms more.
    let api = Api::new(|n| Ok(if n == 100 { ms(15) } else { ms(10) }));
    let (layer, handle) = HedgeLayer::new().pair();
    let client = layer.layer(api.clone());
    warm(&client, 100).await;
    let start = Instant::now();
    let res = client.clone().oneshot(get()).await.unwrap();
    assert_eq!(*res.body(), 100);
    assert_eq!(start.elapsed(), ms(15));
    assert_eq!(api.calls(), 102, "the hedge was sent");
    assert_eq!(api.live.load(Ordering::SeqCst), 0, "and cancelled");
    let s = handle.stats(HOST).unwrap();
    assert_eq!((s.hedges(), s.hedge_wins()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn nothing_is_hedged_before_enough_samples() {
    let api = Api::new(|n| Ok(if n == 50 { ms(1_000) } else { ms(10) }));
    let (layer, handle) = HedgeLayer::new().pair();
    let client = layer.layer(api.clone());
    warm(&client, 50).await;
    let start = Instant::now();
    client.clone().oneshot(get()).await.unwrap();
    assert_eq!(start.elapsed(), ms(1_000));
    assert_eq!(api.calls(), 51);
    assert_eq!(handle.stats(HOST).unwrap().delay(), None);

    // A lower minimum takes effect for services made afterwards.
    let layer = HedgeLayer::new().with_min_samples(10);
    let api = Api::new(|n| Ok(if n == 10 { ms(1_000) } else { ms(10) }));
    let client = layer.layer(api.clone());
    warm(&client, 10).await;
    let start = Instant::now();
    client.clone().oneshot(get()).await.unwrap();
    assert!(start.elapsed() < ms(25));
}

#[tokio::test(start_paused = true)]
async fn unsafe_methods_are_not_hedged_unless_keyed_requests_are_allowed() {
    let slow_posts = |n: u32| Ok(if n >= 100 { ms(1_000) } else { ms(10) });
    let api = Api::new(slow_posts);
    let client = HedgeLayer::new().layer(api.clone());
    warm(&client, 100).await;
    let start = Instant::now();
    client.clone().oneshot(req(Method::POST)).await.unwrap();
    let mut keyed = req(Method::POST);
    keyed
        .headers_mut()
        .insert("idempotency-key", "k1".parse().unwrap());
    client.clone().oneshot(keyed).await.unwrap();
    assert_eq!(start.elapsed(), ms(2_000));
    assert_eq!(api.calls(), 102, "no copy of a POST");

    let api = Api::new(|n| Ok(if n == 100 { ms(1_000) } else { ms(10) }));
    let client = HedgeLayer::new()
        .with_keyed_requests(true)
        .layer(api.clone());
    warm(&client, 100).await;
    let mut keyed = req(Method::POST);
    keyed
        .headers_mut()
        .insert("idempotency-key", "k2".parse().unwrap());
    let start = Instant::now();
    client.clone().oneshot(keyed).await.unwrap();
    assert!(
        start.elapsed() < ms(25),
        "a keyed POST is hedged when allowed"
    );
    client.clone().oneshot(req(Method::POST)).await.unwrap();
    assert_eq!(api.calls(), 103, "a POST without a key still is not");
}

#[tokio::test(start_paused = true)]
async fn the_budget_caps_extra_requests() {
    // Every 5th call is slow: 20 % of calls would want a hedge; the budget allows 5 % + 10.
    let api = Api::new(|n| {
        Ok(if n >= 200 && n % 5 == 0 {
            ms(500)
        } else {
            ms(10)
        })
    });
    let (layer, handle) = HedgeLayer::new().with_percentile(0.7).unwrap().pair();
    let client = layer.layer(api.clone());
    warm(&client, 200).await;
    let before = handle.stats(HOST).unwrap();
    assert_eq!(before.hedges(), 0);
    for _ in 0..1_000 {
        client.clone().oneshot(get()).await.unwrap();
    }
    let s = handle.stats(HOST).unwrap();
    assert_eq!(s.calls(), 1_200);
    // The full budget of 10, then 5 % of 1,200 calls, less what was deposited before it filled.
    assert!(s.hedges() >= 40 && s.hedges() <= 10 + 60, "{}", s.hedges());
    assert_eq!(u64::from(api.calls()), 1_200 + s.hedges());
    assert!(s.extra_ratio() <= 0.06, "{}", s.extra_ratio());
}

#[tokio::test(start_paused = true)]
async fn a_zero_budget_never_hedges() {
    let api = Api::new(|n| Ok(if n >= 100 { ms(100) } else { ms(10) }));
    let client = HedgeLayer::new()
        .with_budget(0.0, 0)
        .unwrap()
        .layer(api.clone());
    warm(&client, 150).await;
    assert_eq!(api.calls(), 150);
}

#[tokio::test(start_paused = true)]
async fn a_failing_copy_waits_for_the_other() {
    // Call 100 is slow and then fails; its copy succeeds.
    let api = Api::new(|n| match n {
        100 => Err(ms(30)),
        _ => Ok(ms(10)),
    });
    let client = HedgeLayer::new().layer(api.clone());
    warm(&client, 100).await;
    let start = Instant::now();
    let res = client.clone().oneshot(get()).await.unwrap();
    assert_eq!(*res.body(), 101);
    assert!(start.elapsed() < ms(25));

    // A hedge that fails while the first copy is still running: the first copy's answer wins.
    let api = Api::new(|n| match n {
        100 => Ok(ms(40)),
        101 => Err(ms(1)),
        _ => Ok(ms(10)),
    });
    let client = HedgeLayer::new().layer(api.clone());
    warm(&client, 100).await;
    let res = client.clone().oneshot(get()).await.unwrap();
    assert_eq!(*res.body(), 100);

    // Both fail: the error is returned.
    let api = Api::new(|n| match n {
        100 => Err(ms(40)),
        101 => Err(ms(20)),
        _ => Ok(ms(10)),
    });
    let client = HedgeLayer::new().layer(api.clone());
    warm(&client, 100).await;
    let err = client.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(err.to_string(), "connection reset");

    // A first copy that fails before the hedge is due fails the call at once, unhedged.
    let api = Api::new(|n| match n {
        100 => Err(ms(2)),
        _ => Ok(ms(10)),
    });
    let client = HedgeLayer::new().layer(api.clone());
    warm(&client, 100).await;
    let start = Instant::now();
    assert!(client.clone().oneshot(get()).await.is_err());
    assert_eq!(start.elapsed(), ms(2));
    assert_eq!(api.calls(), 101);
}

/// A service whose call 100 fails after 40 ms and call 101 (the hedge) after 20 ms, with errors
/// that say opposite things about delivery; the others answer in 10 ms.
fn two_failures(
    first: fn() -> BoxError,
    hedge: fn() -> BoxError,
) -> impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future = impl Send> + Clone
{
    let n = Arc::new(AtomicU32::new(0));
    service_fn(move |_req: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            match i {
                100 => {
                    tokio::time::sleep(ms(40)).await;
                    Err(first())
                }
                101 => {
                    tokio::time::sleep(ms(20)).await;
                    Err(hedge())
                }
                _ => {
                    tokio::time::sleep(ms(10)).await;
                    Ok(Response::new(()))
                }
            }
        }
    })
}

fn reset() -> BoxError {
    std::io::Error::from(std::io::ErrorKind::ConnectionReset).into()
}

fn refused() -> BoxError {
    std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into()
}

#[tokio::test(start_paused = true)]
async fn both_copies_failing_never_claims_not_sent_when_one_may_have_been_processed() {
    use sturdy_core::classify::delivery;
    use sturdy_core::Delivery;
    assert_eq!(delivery(&*reset()), Delivery::MaybeProcessed);
    assert_eq!(delivery(&*refused()), Delivery::NotSent);
    for (first, hedge) in [
        (reset as fn() -> BoxError, refused as fn() -> BoxError),
        (refused, reset),
    ] {
        let client = HedgeLayer::new().layer(two_failures(first, hedge));
        warm(&client, 100).await;
        let err = client.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    }
    // Both refused: nothing was sent.
    let client = HedgeLayer::new().layer(two_failures(refused, refused));
    warm(&client, 100).await;
    let err = client.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
}

#[tokio::test(start_paused = true)]
async fn each_host_has_its_own_delay() {
    let api = service_fn(|req: Request<()>| async move {
        let slow = req.uri().host() == Some("slow.example.com");
        tokio::time::sleep(if slow { ms(200) } else { ms(5) }).await;
        Ok::<_, Infallible>(Response::new(()))
    });
    // A minute's window: the fast host's samples are still recent after the slow host's 20 s.
    let (layer, handle) = HedgeLayer::new()
        .with_window(Duration::from_secs(60))
        .pair();
    let client = layer.layer(api);
    for host in ["fast.example.com", "slow.example.com"] {
        for _ in 0..100 {
            let r = Request::get(format!("http://{host}/")).body(()).unwrap();
            client.clone().oneshot(r).await.unwrap();
        }
    }
    let fast = handle.stats("fast.example.com").unwrap().delay().unwrap();
    let slow = handle.stats("slow.example.com").unwrap().delay().unwrap();
    assert!(fast < ms(6) && slow >= ms(200), "{fast:?} {slow:?}");
    assert_eq!(handle.all().len(), 2);
    assert!(handle.latency_percentile("slow.example.com", 0.5).unwrap() >= ms(200));
    assert_eq!(handle.latency_percentile("slow.example.com", 1.5), None);
}

#[test]
fn bad_settings_are_reported_when_set() {
    for p in [0.0, 1.0, -0.5, f64::NAN] {
        let err = HedgeLayer::new().with_percentile(p).unwrap_err();
        assert_eq!(err.kind(), &sturdy_core::ErrorKind::Config);
        assert!(err.to_string().contains("percentile"), "{err}");
    }
    for r in [-0.1, 1.5, f64::NAN] {
        let err = HedgeLayer::new().with_budget(r, 1).unwrap_err();
        assert!(err.to_string().contains("budget"), "{err}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_setter_after_a_handle_applies_to_the_handle_too() {
    let layer = HedgeLayer::new();
    let handle = layer.handle();
    let layer = layer.with_min_samples(5);
    let api = Api::new(|_| Ok(ms(3)));
    let client = layer.layer(api);
    warm(&client, 20).await;
    assert!(handle.stats(HOST).unwrap().delay().is_some());
}

// ===== readiness =====

#[tokio::test(start_paused = true)]
async fn poll_ready_is_the_inner_services_and_the_first_copy_goes_to_the_ready_service() {
    let (mut svc, mut handle) =
        tower_test::mock::spawn_layer::<Request<()>, Response<()>, _>(HedgeLayer::new());
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(get()));
    let (r, send) = handle.next_request().await.unwrap();
    assert_eq!(r.uri().path(), "/orders/1");
    assert_pending!(fut.poll());
    send.send_response(Response::new(()));
    assert_ready_ok!(fut.poll());
}

/// Over `ConcurrencyLimit(1)`, the first copy holds the only permit: the hedge waits for it and
/// the first copy's answer wins; nothing deadlocks, and no permit is left behind.
#[tokio::test(start_paused = true)]
async fn over_a_full_concurrency_limit_the_hedge_waits_and_nothing_is_stranded() {
    let api = Api::new(|n| Ok(if n == 100 { ms(300) } else { ms(10) }));
    let mut client = ServiceBuilder::new()
        .layer(HedgeLayer::new())
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api.clone());
    // A kept service, driven with ready().call(), as the readiness contract demands.
    for _ in 0..100 {
        client.ready().await.unwrap().call(get()).await.unwrap();
    }
    let start = Instant::now();
    let res = client.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(*res.body(), 100);
    assert_eq!(start.elapsed(), ms(300));
    assert_eq!(
        api.calls(),
        101,
        "no permit for the hedge while the first copy ran"
    );
    // The permit came back.
    tokio::time::timeout(ms(50), client.ready().await.unwrap().call(get()))
        .await
        .expect("no stranded permit")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_cancels_both_copies() {
    let api = Api::new(|n| Ok(if n >= 100 { ms(1_000) } else { ms(10) }));
    let client = ServiceBuilder::new()
        .layer(HedgeLayer::new())
        .layer(ConcurrencyLimitLayer::new(4))
        .service(api.clone());
    warm(&client, 100).await;
    let call = tokio::spawn(client.clone().oneshot(get()));
    tokio::time::sleep(ms(100)).await;
    assert_eq!(
        api.live.load(Ordering::SeqCst),
        2,
        "first copy and hedge in flight"
    );
    call.abort();
    let _ = call.await;
    assert_eq!(api.live.load(Ordering::SeqCst), 0);
    // Every permit is back: four calls run at once.
    let started = Arc::new(Mutex::new(Vec::new()));
    let mut joins = Vec::new();
    for _ in 0..4 {
        let c = client.clone();
        let started = started.clone();
        joins.push(tokio::spawn(async move {
            let mut c = c;
            c.ready().await.unwrap();
            started.lock().unwrap().push(Instant::now());
        }));
    }
    for j in joins {
        tokio::time::timeout(ms(10), j)
            .await
            .expect("no stranded permit")
            .unwrap();
    }
    assert_eq!(started.lock().unwrap().len(), 4);
}

#[test]
fn traits() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}
    type Svc = Hedge<Api, sturdy_core::ByHost>;
    send_sync_clone::<HedgeLayer>();
    send_sync_clone::<Svc>();
    send::<ResponseFuture<Api, ()>>();
    let _ = StatusCode::OK;
}

#[tokio::test(start_paused = true)]
async fn hedges_sent_and_won_are_events() {
    let api = Api::new(|n| Ok(if n == 120 { ms(1_000) } else { ms(10) }));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let layer = HedgeLayer::new().on_event(move |e| match *e {
        sturdy_core::events::Event::HedgeSent { key, host } => {
            s.lock()
                .unwrap()
                .push(("sent", key.to_owned(), host.is_some()));
        }
        sturdy_core::events::Event::HedgeWon { key, host } => {
            s.lock()
                .unwrap()
                .push(("won", key.to_owned(), host.is_some()));
        }
        _ => {}
    });
    let client = layer.layer(api.clone());
    warm(&client, 120).await;
    assert!(seen.lock().unwrap().is_empty(), "fast calls emit nothing");
    let res = client.clone().oneshot(get()).await.unwrap();
    assert_eq!(*res.body(), 121);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            ("sent", HOST.to_owned(), true),
            ("won", HOST.to_owned(), true)
        ]
    );
}

/// A layer that holds every call back for `hold` before passing it on, marking the wait on the
/// call's `AttemptHold` as sturdy's rate limit does (a pause the server asked for).
#[derive(Clone)]
struct Holding<S> {
    inner: S,
    hold: Duration,
    /// Set: only the first call it sees is held (the hedge's copy goes straight on).
    first_only: Option<Arc<AtomicUsize>>,
}

impl<S> Service<Request<()>> for Holding<S>
where
    S: Service<Request<()>, Response = Response<u32>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<u32>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<u32>, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        let mut inner = self.inner.clone();
        let later = self
            .first_only
            .as_ref()
            .is_some_and(|n| n.fetch_add(1, Ordering::SeqCst) > 0);
        let hold = if later { Duration::ZERO } else { self.hold };
        Box::pin(async move {
            let mark = sturdy_core::hold::AttemptHold::of(&req);
            if !hold.is_zero() {
                if let Some(m) = &mark {
                    m.hold(sturdy_core::hold::HeldFor::RateLimit);
                }
                tokio::time::sleep(hold).await;
                if let Some(m) = &mark {
                    m.release();
                }
            }
            inner.ready().await?.call(req).await
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_held_back_below_is_not_hedged_while_it_waits() {
    // Warm with fast calls, then one call held 1 s below the hedge (as by a server's pause)
    // and answered 10 ms after it is let go: never hedged, no token spent.
    let api = Api::new(|_| Ok(ms(10)));
    let (layer, handle) = HedgeLayer::new().pair();
    let fast = layer.layer(api.clone());
    warm(&fast, 120).await;
    let held = layer.layer(Holding {
        inner: api.clone(),
        hold: ms(1_000),
        first_only: None,
    });
    let before = api.calls();
    let start = Instant::now();
    held.clone().oneshot(get()).await.unwrap();
    assert_eq!(start.elapsed(), ms(1_010));
    assert_eq!(api.calls() - before, 1, "a held call was hedged");
    assert_eq!(handle.stats(HOST).unwrap().hedges(), 0);

    // A call that is slow once sent is still hedged after the delay, held before or not.
    let slow = Api::new(|n| Ok(if n == 0 { ms(1_000) } else { ms(10) }));
    let held_then_slow = layer.layer(Holding {
        inner: slow.clone(),
        hold: ms(200),
        first_only: None,
    });
    let res = held_then_slow.clone().oneshot(get()).await.unwrap();
    assert_eq!(*res.body(), 1, "the hedge answered");
    assert_eq!(handle.stats(HOST).unwrap().hedges(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_call_held_back_for_a_minute_is_not_woken_every_delay() {
    // A call held 60 s below (a long pause the server asked for) waits for the layer that holds
    // it to let it go: its task is not polled once per hedge delay meanwhile (6,000 times at a
    // 10 ms delay), and once let go it is hedged, if still slow, one delay later.
    let api = Api::new(|n| Ok(if n == 120 { ms(1_000) } else { ms(10) }));
    let (layer, handle) = HedgeLayer::new().pair();
    let fast = layer.layer(api.clone());
    warm(&fast, 120).await;
    let delay = handle
        .stats(HOST)
        .unwrap()
        .delay()
        .expect("a delay after warming");
    let held = layer.layer(Holding {
        inner: api.clone(),
        hold: ms(60_000),
        first_only: Some(Arc::new(AtomicUsize::new(0))),
    });
    let mut call = std::pin::pin!(held.clone().oneshot(get()));
    let mut polls = 0u32;
    let start = Instant::now();
    let res = std::future::poll_fn(|cx| {
        polls += 1;
        call.as_mut().poll(cx)
    })
    .await
    .unwrap();
    assert_eq!(*res.body(), 121, "the hedge answered the slow first copy");
    assert_eq!(handle.stats(HOST).unwrap().hedges(), 1);
    // Let go at 60 s, hedged one delay later, answered 10 ms after that.
    // (The timer rounds the delay up to the next millisecond.)
    let took = start.elapsed();
    let least = ms(60_000) + delay + ms(10);
    assert!(took >= least && took <= least + ms(1), "{took:?}");
    assert!(polls < 10, "polled {polls} times while held");
}
