//! s37: hedging, the adaptive concurrency limit and coalescing composed with tower's layers and
//! inside `ClientBuilder` (README.md, src/client.rs docs, docs/guides/{hedge,concurrency,
//! coalesce}.md).

#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::{BoxError, CallOptions};
use sturdy::hedge::HedgeLayer;
use sturdy::ClientBuilder;
use tower::buffer::BufferLayer;
use tower::limit::ConcurrencyLimitLayer;
use tower::timeout::TimeoutLayer;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

type Mock = tower_test::mock::Mock<Request<Full<Bytes>>, Response<Full<Bytes>>>;

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

/// Polls `svc`'s readiness: Pending while the mock allows nothing, then the mock's error.
fn pending_then_error<S>(
    mut svc: S,
    mh: &mut tower_test::mock::Handle<Request<Full<Bytes>>, Response<Full<Bytes>>>,
    name: &str,
) where
    S: Service<Request<Full<Bytes>>, Error = BoxError>,
{
    let mut t = tokio_test::task::spawn(());
    mh.allow(0);
    tokio_test::assert_pending!(t.enter(|cx, _| svc.poll_ready(cx)), "{name}");
    mh.send_error("upstream pool closed");
    assert!(t.is_woken(), "{name}: woken by the error");
    let err = match t.enter(|cx, _| svc.poll_ready(cx)) {
        std::task::Poll::Ready(Err(e)) => e,
        other => panic!("{name}: {other:?}"),
    };
    assert!(
        format!("{err}").contains("upstream pool closed"),
        "{name}: {err}"
    );
}

/// hedge.md: "Readiness: `poll_ready` is the inner service's"; concurrency.md: "never reserved in
/// `poll_ready`, whose readiness is the inner service's"; coalesce.md: "Readiness: `poll_ready` is
/// the inner service's." An inner service whose readiness is Pending and then fails: each layer
/// is Pending, wakes, and returns the inner error with its words.
#[tokio::test(start_paused = true)]
async fn s37_readiness_pending_then_error_passes_through_each_layer() {
    let (mock, mut mh) = tower_test::mock::pair::<Request<Full<Bytes>>, Response<Full<Bytes>>>();
    pending_then_error(HedgeLayer::new().layer(mock), &mut mh, "hedge");
    let (mock, mut mh) = tower_test::mock::pair::<Request<Full<Bytes>>, Response<Full<Bytes>>>();
    pending_then_error(
        AdaptiveConcurrencyLayer::new().layer(mock),
        &mut mh,
        "concurrency",
    );
    let (mock, mut mh) = tower_test::mock::pair::<Request<Full<Bytes>>, Response<Full<Bytes>>>();
    let m: Mock = mock;
    pending_then_error(CoalesceLayer::new().layer(m), &mut mh, "coalesce");
}

/// Answers "page" after 20 ms; counts calls.
fn page_api(
    n: Arc<AtomicUsize>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_req: Request<Full<Bytes>>| {
        n.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(ms(20)).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("page"))))
        }
    })
}

/// README: "The client is `Clone + Send + Sync`" and `ClientBuilder::with_coalesce`: "Identical
/// safe calls in flight share one whole outcome, retries included"; with hedging and the adaptive
/// limit inside. 40 tasks cloning one client get one upstream call; the limit's places all come
/// back.
#[tokio::test(start_paused = true)]
async fn s37_builder_with_all_three_is_send_sync_and_shares_one_call() {
    fn send_sync<T: Send + Sync + Clone + 'static>(_: &T) {}
    let n = Arc::new(AtomicUsize::new(0));
    let (conc, ch) = AdaptiveConcurrencyLayer::new().pair();
    let (coal, kh) = CoalesceLayer::new().pair();
    let client = ClientBuilder::new()
        .with_hedge(HedgeLayer::new().with_min_samples(5))
        .with_adaptive_concurrency(conc)
        .with_coalesce(coal)
        .build(page_api(n.clone()));
    send_sync(&client);
    let client = Arc::new(client);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let c = (*client).clone();
        tasks.push(tokio::spawn(async move {
            let res = c.oneshot(get("http://api.example.com/p")).await?;
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(body)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "page");
    }
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(kh.stats().joined(), 39);
    assert_eq!(ch.state("api.example.com").unwrap().in_flight(), 0);
}

/// coalesce.md: "GET and HEAD requests ... that carry no `CallOptions` (a deadline, no retries: a
/// shared call would run under the settings of whichever request started it, so such a request
/// goes on its own, under its own)." Through `ClientBuilder`, two identical GETs with a deadline
/// send two requests.
#[tokio::test(start_paused = true)]
async fn s37_builder_gets_with_call_options_go_on_their_own() {
    let n = Arc::new(AtomicUsize::new(0));
    let client = ClientBuilder::new()
        .with_coalesce(CoalesceLayer::new())
        .build(page_api(n.clone()));
    let with_deadline = || {
        let mut r = get("http://api.example.com/p");
        r.extensions_mut()
            .insert(CallOptions::new().with_deadline(Duration::from_secs(5)));
        r
    };
    let a = tokio::spawn(client.clone().oneshot(with_deadline()));
    tokio::task::yield_now().await;
    let b = tokio::spawn(client.clone().oneshot(with_deadline()));
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    assert!(!a.body().is_shared() && !b.body().is_shared());
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

/// hedge.md: "Over a `ConcurrencyLimit(1)` (or a full limit), the first copy holds the permit, so
/// the hedge waits for one and the first answer wins"; README: "can sit under a `Buffer` ...,
/// driven by ... a kept `ready().await?.call(req)`". A kept service Buffer -> Hedge ->
/// AdaptiveConcurrency -> ConcurrencyLimit(1) -> slow service, driven 30 times in a row, and
/// 20 tasks on clones, all finish.
#[tokio::test(start_paused = true)]
async fn s37_kept_hedged_limited_service_under_buffer_over_limit_one_never_stalls() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(if i % 7 == 6 { 300 } else { 10 })).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("x"))))
        }
    });
    let (conc, ch) = AdaptiveConcurrencyLayer::new().pair();
    let (hedge, hh) = HedgeLayer::new()
        .with_min_samples(5)
        .with_budget(1.0, 100)
        .unwrap()
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(BufferLayer::new(4))
        .layer(hedge)
        .layer(conc)
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api);
    let run = async {
        for _ in 0..30 {
            let res = svc
                .ready()
                .await?
                .call(get("http://api.example.com/k"))
                .await?;
            assert_eq!(res.status(), 200);
        }
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let s = svc.clone();
            tasks.push(tokio::spawn(s.oneshot(get("http://api.example.com/k"))));
        }
        for t in tasks {
            t.await.unwrap()?;
        }
        Ok::<_, BoxError>(())
    };
    tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("no stall")
        .unwrap();
    assert_eq!(ch.state("api.example.com").unwrap().in_flight(), 0);
    assert!(hh.stats("api.example.com").unwrap().calls() == 50);
}

/// hedge.md: "Each copy then is an attempt ... that gets its own per-attempt timeout". Hedge over
/// tower's `Timeout(100 ms)`: a first copy that stalls is overtaken by the hedge, which answers
/// before the first copy's timeout; the call succeeds.
#[tokio::test(start_paused = true)]
async fn s37_hedge_over_a_timeout_layer_answers_before_the_first_copy_times_out() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            if i == 5 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(ms(10)).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("x"))))
        }
    });
    let (hedge, hh) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(ms(30), ms(30))
        .pair();
    let svc = ServiceBuilder::new()
        .layer(hedge)
        .layer(TimeoutLayer::new(ms(100)))
        .service(api);
    for _ in 0..5 {
        svc.clone()
            .oneshot(get("http://api.example.com/t"))
            .await
            .unwrap();
    }
    let start = tokio::time::Instant::now();
    svc.clone()
        .oneshot(get("http://api.example.com/t"))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), ms(40));
    assert_eq!(hh.stats("api.example.com").unwrap().hedge_wins(), 1);
}

/// hedge.md (Where it goes): "Each copy then is an attempt ... that gets its own per-attempt
/// timeout" and "when both fail, the call fails with the later error". Through `ClientBuilder`
/// (no retry) with a 100 ms attempt timeout and a 30 ms hedge delay, two stalled copies time out
/// at 100 ms and 130 ms: the call fails at 130 ms with a timeout.
#[tokio::test(start_paused = true)]
async fn s37_builder_each_hedged_copy_has_its_own_attempt_timeout() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let http = service_fn(move |_req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            if i >= 5 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(ms(10)).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("x"))))
        }
    });
    let (hedge, hh) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(ms(30), ms(30))
        .pair();
    let client = ClientBuilder::new()
        .without_retry()
        .with_hedge(hedge)
        .with_attempt_timeout(ms(100))
        .build(http);
    for _ in 0..5 {
        client
            .clone()
            .oneshot(get("http://api.example.com/t"))
            .await
            .unwrap();
    }
    let start = tokio::time::Instant::now();
    let err = client
        .clone()
        .oneshot(get("http://api.example.com/t"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), ms(130), "{err}");
    assert!(
        matches!(
            sturdy::core::classify::classify_error(&*err),
            sturdy::core::ErrorKind::Timeout
        ),
        "{err}"
    );
    assert_eq!(n.load(Ordering::SeqCst), 7);
    assert_eq!(hh.stats("api.example.com").unwrap().hedges(), 1);
}

/// concurrency.md: "Below the hedging layer, each hedged copy takes a place of its own, so hedging
/// cannot push a host past its limit" and hedge.md: "When one copy fails with an error while the
/// other is still running, the call waits for the other". A limit of one that sheds (max wait 0):
/// the hedge is refused, the first copy still answers the call.
#[tokio::test(start_paused = true)]
async fn s37_a_hedge_refused_by_a_full_shedding_limit_leaves_the_first_copy() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(if i == 5 { 200 } else { 10 })).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("x"))))
        }
    });
    let (conc, ch) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let (hedge, hh) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(ms(20), ms(20))
        .pair();
    let svc = ServiceBuilder::new().layer(hedge).layer(conc).service(api);
    for _ in 0..5 {
        svc.clone()
            .oneshot(get("http://api.example.com/t"))
            .await
            .unwrap();
    }
    let start = tokio::time::Instant::now();
    let res = svc
        .clone()
        .oneshot(get("http://api.example.com/t"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(start.elapsed(), ms(200));
    assert_eq!(
        n.load(Ordering::SeqCst),
        6,
        "the hedge never reached the service"
    );
    assert_eq!(ch.state("api.example.com").unwrap().in_flight(), 0);
    assert_eq!(hh.stats("api.example.com").unwrap().hedge_wins(), 0);
}

/// coalesce.md: "each caller gets a `sturdy_core::Error` whose kind and delivery are the shared
/// error's ..., and whose source chain holds a `SharedError` and then the shared error itself:
/// `sturdy_core::find` ... and `classify_error` work as for the original"; concurrency.md: a
/// refused call is "a `sturdy_core::Error` of kind `RateLimited` ..., delivery `NotSent`, whose
/// source is `LimitReached`". A shared call refused by a full adaptive limit below: the joiner
/// finds the `LimitReached`, the kind and "not sent".
#[tokio::test(start_paused = true)]
async fn s37_a_shared_call_refused_by_the_limit_below_reads_the_same_for_a_joiner() {
    let n = Arc::new(AtomicUsize::new(0));
    let (conc, _ch) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = CoalesceLayer::new().layer(conc.layer(page_api(n.clone())));
    // Fill the limit with a call that does not coalesce (a POST).
    let mut busy = tokio_test::task::spawn(
        svc.clone().oneshot(
            Request::post("http://api.example.com/p")
                .body(Full::default())
                .unwrap(),
        ),
    );
    tokio_test::assert_pending!(busy.poll());
    let mut s1 = svc.clone();
    s1.ready().await.unwrap();
    let lead = s1.call(get("http://api.example.com/a"));
    let mut s2 = svc.clone();
    s2.ready().await.unwrap();
    let join = s2.call(get("http://api.example.com/a"));
    let (lead, join) = tokio::join!(lead, join);
    for (who, res) in [("leader", lead), ("joiner", join)] {
        let Err(err) = res else {
            panic!("{who}: answered");
        };
        let reached = sturdy::core::find::<sturdy::concurrency::LimitReached>(&*err);
        assert!(reached.is_some(), "{who}: no LimitReached in {err}");
        assert_eq!(
            sturdy::core::classify::delivery(&*err),
            sturdy::core::Delivery::NotSent,
            "{who}"
        );
        assert!(
            matches!(
                sturdy::core::classify::classify_error(&*err),
                sturdy::core::ErrorKind::RateLimited { retry_after: None }
            ),
            "{who}: {err}"
        );
        assert!(err.to_string().contains("api.example.com"), "{who}: {err}");
    }
    assert_eq!(n.load(Ordering::SeqCst), 1, "only the POST was sent");
    drop(busy);
}
