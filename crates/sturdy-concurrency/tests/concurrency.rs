//! The adaptive limit on paused time, against in-process servers and tower-test mocks.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use sturdy_concurrency::{
    AdaptiveConcurrency, AdaptiveConcurrencyLayer, Algorithm, ConcurrencyHandle, LimitReached,
    ResponseFuture,
};
use sturdy_core::classify::delivery;
use sturdy_core::{BoxError, Delivery, ErrorKind};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const HOST: &str = "api.example.com";

fn get() -> Request<()> {
    Request::get(format!("http://{HOST}/orders"))
        .body(())
        .unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A server that serves `capacity` calls at once in 10 ms each. Past that, in `Shed` mode it
/// answers 503 at once; in `Queue` mode it shares itself out: a call that arrives with `k` in
/// flight takes `10 ms × k / capacity`.
#[derive(Clone)]
struct Server {
    capacity: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    ok: Arc<AtomicU64>,
    shed: Arc<AtomicU64>,
    queue: bool,
}

impl Server {
    fn new(capacity: usize, queue: bool) -> Self {
        Self {
            capacity: Arc::new(AtomicUsize::new(capacity)),
            in_flight: Arc::default(),
            peak: Arc::default(),
            ok: Arc::default(),
            shed: Arc::default(),
            queue,
        }
    }
}

impl Service<Request<()>> for Server {
    type Response = Response<()>;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<()>, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<()>) -> Self::Future {
        let s = self.clone();
        Box::pin(async move {
            let k = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            s.peak.fetch_max(k, Ordering::SeqCst);
            let cap = s.capacity.load(Ordering::SeqCst);
            let status = if k > cap && !s.queue {
                s.shed.fetch_add(1, Ordering::SeqCst);
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                let f = (k as f64 / cap as f64).max(1.0);
                tokio::time::sleep(Duration::from_secs_f64(0.010 * f)).await;
                s.ok.fetch_add(1, Ordering::SeqCst);
                StatusCode::OK
            };
            s.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(Response::builder().status(status).body(()).unwrap())
        })
    }
}

/// `callers` loops calling `client` until `until`.
async fn load<S>(client: &S, callers: usize, for_: Duration)
where
    S: Service<Request<()>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    S::Response: Send,
{
    let until = Instant::now() + for_;
    let mut joins = Vec::new();
    for _ in 0..callers {
        let client = client.clone();
        joins.push(tokio::spawn(async move {
            while Instant::now() < until {
                let _ = client.clone().oneshot(get()).await;
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
}

fn limit(h: &ConcurrencyHandle) -> usize {
    h.limit(HOST).unwrap()
}

#[tokio::test(start_paused = true)]
async fn aimd_converges_to_a_shedding_servers_capacity_and_recovers() {
    let server = Server::new(30, false);
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let client = layer.layer(server.clone());

    load(&client, 80, ms(2_000)).await;
    let l = limit(&handle);
    assert!((24..=31).contains(&l), "converged near 30: {l}");

    // Capacity halves: the limit follows.
    server.capacity.store(15, Ordering::SeqCst);
    load(&client, 80, ms(2_000)).await;
    let l = limit(&handle);
    assert!((11..=16).contains(&l), "followed capacity down to 15: {l}");

    // Capacity returns: the limit climbs back (about one per round trip).
    server.capacity.store(30, Ordering::SeqCst);
    load(&client, 80, ms(3_000)).await;
    let l = limit(&handle);
    assert!((24..=31).contains(&l), "recovered near 30: {l}");

    // The calls the limit held back waited client-side instead of being shed: most calls worked.
    let (ok, shed) = (
        server.ok.load(Ordering::SeqCst),
        server.shed.load(Ordering::SeqCst),
    );
    assert!(shed * 20 < ok, "{shed} shed for {ok} served");
}

#[tokio::test(start_paused = true)]
async fn vegas_settles_just_above_a_queueing_servers_capacity_without_errors() {
    let server = Server::new(30, true);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .pair();
    let client = layer.layer(server.clone());
    load(&client, 80, ms(2_000)).await;
    let l = limit(&handle);
    assert!((30..=42).contains(&l), "a few calls above 30: {l}");
    assert_eq!(
        handle.state(HOST).unwrap().baseline(),
        Some(ms(10)),
        "the no-load latency"
    );

    server.capacity.store(15, Ordering::SeqCst);
    load(&client, 80, ms(2_000)).await;
    let l = limit(&handle);
    assert!((15..=25).contains(&l), "followed capacity down: {l}");

    server.capacity.store(30, Ordering::SeqCst);
    load(&client, 80, ms(2_000)).await;
    let l = limit(&handle);
    assert!((30..=42).contains(&l), "recovered: {l}");
    assert_eq!(server.shed.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn vegas_starting_far_above_capacity_finds_it() {
    let server = Server::new(30, true);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .with_initial_limit(200)
        .pair();
    let client = layer.layer(server.clone());
    load(&client, 250, ms(3_000)).await;
    let l = limit(&handle);
    assert!((30..=45).contains(&l), "came down near 30: {l}");
}

#[tokio::test(start_paused = true)]
async fn a_full_limit_makes_calls_wait_in_line_then_fail_after_the_maximum_wait() {
    let server = Server::new(100, true);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(2, 2)
        .with_max_wait(ms(25))
        .pair();
    let client = layer.layer(server.clone());
    let start = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client.clone().oneshot(get())))
        .collect();
    tokio::task::yield_now().await;
    let s = handle.state(HOST).unwrap();
    assert_eq!((s.limit(), s.in_flight(), s.waiting()), (2, 2, 2));
    for c in calls {
        c.await.unwrap().unwrap();
    }
    // Two at a time, 10 ms each.
    assert_eq!(start.elapsed(), ms(20));
    assert_eq!(server.peak.load(Ordering::SeqCst), 2);

    // Eight calls, two at a time: the last two would wait 30 ms > 25 ms.
    let calls: Vec<_> = (0..8)
        .map(|_| tokio::spawn(client.clone().oneshot(get())))
        .collect();
    let mut errors = Vec::new();
    for c in calls {
        if let Err(e) = c.await.unwrap() {
            errors.push(e);
        }
    }
    assert_eq!(errors.len(), 2);
    let err = &errors[0];
    let reached = sturdy_core::find::<LimitReached>(&**err).unwrap();
    assert_eq!(
        (reached.key(), reached.limit(), reached.waited()),
        (HOST, 2, ms(25))
    );
    let top = err.downcast_ref::<sturdy_core::Error>().unwrap();
    assert_eq!(top.kind(), &ErrorKind::RateLimited { retry_after: None });
    assert_eq!(delivery(&**err), Delivery::NotSent);
    assert_eq!(
        err.to_string(),
        "the concurrency limit for api.example.com (2 calls at once) stayed full for 25ms; \
         the call was not sent: try again later or raise the maximum wait"
    );
    let s = handle.state(HOST).unwrap();
    assert_eq!((s.in_flight(), s.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_zero_wait_sheds_at_once() {
    let server = Server::new(100, true);
    let client = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .layer(server.clone());
    let first = tokio::spawn(client.clone().oneshot(get()));
    tokio::task::yield_now().await;
    let start = Instant::now();
    let err = client.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert!(sturdy_core::find::<LimitReached>(&*err).is_some());
    first.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn dropped_calls_give_back_their_permit_and_their_place_in_line() {
    let server = Server::new(100, true);
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let client = layer.layer(server.clone());
    let running = tokio::spawn(client.clone().oneshot(get()));
    let waiting = tokio::spawn(client.clone().oneshot(get()));
    tokio::task::yield_now().await;
    let s = handle.state(HOST).unwrap();
    assert_eq!((s.in_flight(), s.waiting()), (1, 1));
    running.abort();
    waiting.abort();
    let _ = (running.await, waiting.await);
    let s = handle.state(HOST).unwrap();
    assert_eq!((s.in_flight(), s.waiting()), (0, 0));
    // The one place is free.
    tokio::time::timeout(ms(15), client.clone().oneshot(get()))
        .await
        .expect("no stranded permit")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn each_host_has_its_own_limit_and_a_handle_can_set_one() {
    let server = Server::new(100, true);
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_initial_limit(7).pair();
    let client = layer.layer(server);
    for host in ["a.example.com", "b.example.com"] {
        let r = Request::get(format!("http://{host}/")).body(()).unwrap();
        client.clone().oneshot(r).await.unwrap();
    }
    assert_eq!(handle.states().len(), 2);
    handle.set_limit("a.example.com", 3);
    assert_eq!(handle.limit("a.example.com"), Some(3));
    assert_eq!(handle.limit("b.example.com"), Some(7));
    handle.set_limit("b.example.com", 5_000);
    assert_eq!(
        handle.limit("b.example.com"),
        Some(1_000),
        "taken into the bounds"
    );
}

#[test]
fn settings_never_panic() {
    for r in [0.0, 1.0, -1.0, f64::NAN] {
        let err = AdaptiveConcurrencyLayer::new().with_backoff(r).unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config);
        assert!(err.to_string().contains("backoff"), "{err}");
    }
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(0, 0)
        .with_initial_limit(0)
        .pair();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let client = layer.layer(Server::new(10, true));
    rt.block_on(client.oneshot(get())).unwrap();
    assert_eq!(handle.limit(HOST), Some(1), "a limit of 0 is taken as 1");
}

// ===== readiness =====

#[tokio::test(start_paused = true)]
async fn poll_ready_is_the_inner_services() {
    let (mut svc, mut handle) = tower_test::mock::spawn_layer::<Request<()>, Response<()>, _>(
        AdaptiveConcurrencyLayer::new(),
    );
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(get()));
    let (_, send) = handle.next_request().await.unwrap();
    assert_pending!(fut.poll());
    send.send_response(Response::new(()));
    assert_ready_ok!(fut.poll());
}

/// Over `ConcurrencyLimit(2)` with a limit of 1 here: the second caller's ready service holds
/// the inner permit while it waits for a place here, then is called with it. Driving a fresh
/// clone to readiness instead would need a third inner permit and deadlock.
#[tokio::test(start_paused = true)]
async fn a_waiting_call_uses_the_service_poll_ready_made_ready() {
    let server = Server::new(100, true);
    let svc = ServiceBuilder::new()
        .layer(AdaptiveConcurrencyLayer::new().with_limits(1, 1))
        .layer(ConcurrencyLimitLayer::new(2))
        .service(server.clone());
    let mut a = svc.clone();
    let mut b = svc.clone();
    let fa = a.ready().await.unwrap().call(get());
    let fb = b.ready().await.unwrap().call(get());
    let start = Instant::now();
    let (ra, rb) = tokio::time::timeout(ms(100), async { tokio::join!(fa, fb) })
        .await
        .expect("no deadlock");
    ra.unwrap();
    rb.unwrap();
    assert_eq!(start.elapsed(), ms(20), "one after the other");
    // Kept services keep working.
    for _ in 0..3 {
        tokio::time::timeout(ms(100), a.ready().await.unwrap().call(get()))
            .await
            .expect("no stranded permit")
            .unwrap();
    }
}

#[test]
fn traits() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}
    type Svc = AdaptiveConcurrency<Server, sturdy_core::ByHost, sturdy_core::DefaultClassify>;
    send_sync_clone::<AdaptiveConcurrencyLayer>();
    send_sync_clone::<Svc>();
    send_sync_clone::<ConcurrencyHandle>();
    send::<ResponseFuture<Server, (), sturdy_core::DefaultClassify>>();
}

#[tokio::test(start_paused = true)]
async fn limit_changes_and_refusals_are_events() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let layer = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(10)
        .with_max_wait(Duration::ZERO)
        .on_event(move |e| {
            let line = match *e {
                sturdy_core::events::Event::ConcurrencyLimitChanged { host, from, to, .. } => {
                    format!("{} {from} -> {to}", host.unwrap_or("-"))
                }
                sturdy_core::events::Event::ConcurrencyRejected { host, limit, .. } => {
                    format!("{} refused at {limit}", host.unwrap_or("-"))
                }
                _ => return,
            };
            s.lock().unwrap().push(line);
        });
    // An overload answer lowers the limit (10 * 0.9 = 9).
    let busy = tower::service_fn(|_r: Request<()>| async {
        let mut res = Response::new(());
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Ok::<_, BoxError>(res)
    });
    let client = layer.clone().layer(busy);
    let res = client.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Nine calls in flight fill the limit; a tenth is refused at once.
    let slow = tower::service_fn(|_r: Request<()>| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, BoxError>(Response::new(()))
    });
    let client = layer.layer(slow);
    let held: Vec<_> = (0..9)
        .map(|_| tokio::spawn(client.clone().oneshot(get())))
        .collect();
    tokio::task::yield_now().await;
    assert!(client.clone().oneshot(get()).await.is_err());
    for h in held {
        h.await.unwrap().unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen[..2],
        [format!("{HOST} 10 -> 9"), format!("{HOST} refused at 9")]
    );
}
