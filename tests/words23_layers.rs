//! Hedge, coalesce and adaptive concurrency layers under Buffer and ConcurrencyLimit(1), kept
//! services, dropped calls at each await point and hostile settings, on paused time.
#![cfg(feature = "full")]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, LimitReached};
use sturdy::hedge::HedgeLayer;
use sturdy::ClientBuilder;
use tokio::time::{advance, timeout, Instant};
use tokio_test::task::spawn;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

pub(crate) const HOST: &str = "api.example.com";
pub(crate) const BOUND: Duration = Duration::from_secs(120);

#[derive(Clone, Copy)]
pub(crate) enum Plan {
    After(u64),
    Never,
    /// Answers with this status after this many ms.
    Status(u64, u16),
    /// Fails with an I/O error of this kind after this many ms.
    Fail(u64, io::ErrorKind),
}

#[derive(Default)]
pub(crate) struct Counts {
    started: AtomicUsize,
    live: AtomicUsize,
    max_live: AtomicUsize,
    seen: Mutex<HashMap<String, usize>>,
}

struct Live(Arc<Counts>);

impl Live {
    fn new(c: Arc<Counts>) -> Self {
        let now = c.live.fetch_add(1, SeqCst) + 1;
        c.max_live.fetch_max(now, SeqCst);
        Self(c)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, SeqCst);
    }
}

type PlanFn = Arc<dyn Fn(&str, usize) -> Plan + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Api {
    counts: Arc<Counts>,
    plan: PlanFn,
    body: Bytes,
}

impl Api {
    pub(crate) fn new(plan: impl Fn(&str, usize) -> Plan + Send + Sync + 'static) -> Self {
        Self {
            counts: Arc::default(),
            plan: Arc::new(plan),
            body: Bytes::from_static(b"payload"),
        }
    }
    pub(crate) fn started(&self) -> usize {
        self.counts.started.load(SeqCst)
    }
    pub(crate) fn live(&self) -> usize {
        self.counts.live.load(SeqCst)
    }
    pub(crate) fn max_live(&self) -> usize {
        self.counts.max_live.load(SeqCst)
    }
}

impl Service<Request<Full<Bytes>>> for Api {
    type Response = Response<Full<Bytes>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let uri = req.uri().to_string();
        let n = {
            let mut seen = self.counts.seen.lock().unwrap();
            let e = seen.entry(uri.clone()).or_insert(0);
            *e += 1;
            *e - 1
        };
        let plan = (self.plan)(&uri, n);
        self.counts.started.fetch_add(1, SeqCst);
        let live = Live::new(self.counts.clone());
        let body = self.body.clone();
        Box::pin(async move {
            let _live = live;
            match plan {
                Plan::After(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(Response::new(Full::new(body)))
                }
                Plan::Never => std::future::pending().await,
                Plan::Status(ms, code) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let mut res = Response::new(Full::new(body));
                    *res.status_mut() = http::StatusCode::from_u16(code).unwrap();
                    Ok(res)
                }
                Plan::Fail(ms, kind) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Err(io::Error::new(kind, "the test server failed"))
                }
            }
        })
    }
}

pub(crate) fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{HOST}{path}"))
        .body(Full::default())
        .unwrap()
}

pub(crate) async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match timeout(BOUND, f).await {
        Ok(out) => out,
        Err(_) => panic!("no answer within {BOUND:?}: {what}"),
    }
}

/// Slow (1 s) the first time a path containing "slow" is sent, 10 ms otherwise.
pub(crate) fn slow_once(uri: &str, n: usize) -> Plan {
    if uri.contains("slow") && n == 0 {
        Plan::After(1_000)
    } else {
        Plan::After(10)
    }
}

/// Drives a kept service: `ready().await?.call(req)` `n` times, every tenth call slow once.
pub(crate) async fn drive_kept<S, Rb>(svc: &mut S, tag: &str, n: usize)
where
    S: Service<Request<Full<Bytes>>, Response = Response<Rb>>,
    S::Error: std::fmt::Debug,
    Rb: http_body::Body,
    Rb::Error: std::fmt::Debug,
{
    for i in 0..n {
        let path = if i % 10 == 9 {
            format!("/slow/{tag}/{i}")
        } else {
            format!("/fast/{tag}/{i}")
        };
        let res = within(&format!("{tag} call {i}"), async {
            let fut = svc.ready().await.expect("ready").call(get(&path));
            fut.await.expect("call")
        })
        .await;
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "payload");
    }
}

async fn drive_from_tasks<S, Rb>(svc: S, tasks: usize, n: usize)
where
    S: Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
    Rb: http_body::Body + Send + 'static,
    Rb::Error: std::fmt::Debug,
    Rb::Data: Send,
{
    let mut joins = Vec::new();
    for t in 0..tasks {
        let mut svc = svc.clone();
        joins.push(tokio::spawn(async move {
            drive_kept(&mut svc, &format!("task{t}"), n).await;
        }));
    }
    for j in joins {
        within("task", j).await.unwrap();
    }
}

pub(crate) fn hedge() -> (HedgeLayer, sturdy::hedge::HedgeHandle) {
    HedgeLayer::new().with_min_samples(5).pair()
}

#[tokio::test(start_paused = true)]
async fn words23_hedge_kept_under_buffer_and_limit_one() {
    let api = Api::new(slow_once);
    let (layer, handle) = hedge();
    let mut svc = ServiceBuilder::new()
        .buffer(16)
        .concurrency_limit(1)
        .layer(layer)
        .service(api.clone());
    drive_kept(&mut svc, "kept", 60).await;
    drive_from_tasks(svc, 8, 20).await;
    let stats = handle.stats(HOST).unwrap();
    assert_eq!(stats.calls(), 60 + 8 * 20);
    assert!(stats.hedges() >= 1, "slow calls were hedged: {stats:?}");
    assert!(stats.hedge_wins() <= stats.hedges());
    assert_eq!(api.live(), 0, "every copy finished or was dropped");
}

#[tokio::test(start_paused = true)]
async fn words23_hedge_over_limit_one_under_buffer() {
    let api = Api::new(slow_once);
    let (layer, handle) = hedge();
    let mut svc = ServiceBuilder::new()
        .buffer(16)
        .layer(layer)
        .concurrency_limit(1)
        .service(api.clone());
    drive_kept(&mut svc, "kept", 60).await;
    drive_from_tasks(svc, 8, 20).await;
    let stats = handle.stats(HOST).unwrap();
    assert_eq!(stats.calls(), 60 + 8 * 20);
    assert!(stats.hedge_wins() <= stats.hedges());
    assert_eq!(api.max_live(), 1, "ConcurrencyLimit(1) below the hedge");
    assert_eq!(api.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn words23_coalesce_kept_under_buffer_and_limit_one() {
    let api = Api::new(|_, _| Plan::After(20));
    let (layer, handle) = CoalesceLayer::new().pair();
    let mut svc = ServiceBuilder::new()
        .buffer(16)
        .concurrency_limit(1)
        .layer(layer)
        .service(api.clone());
    drive_kept(&mut svc, "kept", 30).await;
    drive_from_tasks(svc, 8, 20).await;
    let stats = handle.stats();
    assert_eq!(stats.calls(), 30 + 8 * 20);
    assert_eq!(
        stats.upstream() + stats.joined(),
        stats.calls(),
        "{stats:?}"
    );
    assert_eq!(stats.upstream() as usize, api.started());
    assert_eq!(handle.in_flight(HOST), 0);
    assert_eq!(api.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn words23_coalesce_over_limit_one_under_buffer_identical_burst() {
    let api = Api::new(|_, _| Plan::After(20));
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = ServiceBuilder::new()
        .buffer(64)
        .layer(layer)
        .concurrency_limit(1)
        .service(api.clone());
    let mut joins = Vec::new();
    for _ in 0..50 {
        let mut svc = svc.clone();
        joins.push(tokio::spawn(async move {
            for _ in 0..5 {
                let res = svc.ready().await.unwrap().call(get("/same")).await.unwrap();
                let body = res.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, "payload");
            }
        }));
    }
    for j in joins {
        within("identical caller", j).await.unwrap();
    }
    let stats = handle.stats();
    assert_eq!(stats.calls(), 250);
    assert_eq!(stats.upstream() + stats.joined(), 250, "{stats:?}");
    assert_eq!(stats.upstream() as usize, api.started());
    assert_eq!(api.max_live(), 1);
    assert_eq!(handle.in_flight(HOST), 0);
}

#[tokio::test(start_paused = true)]
async fn words23_adaptive_kept_under_buffer_and_limit_one() {
    let api = Api::new(slow_once);
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let mut svc = ServiceBuilder::new()
        .buffer(16)
        .concurrency_limit(1)
        .layer(layer)
        .service(api.clone());
    drive_kept(&mut svc, "kept", 30).await;
    drive_from_tasks(svc, 8, 10).await;
    let state = handle.state(HOST).unwrap();
    assert_eq!((state.in_flight(), state.waiting()), (0, 0));
    assert_eq!(api.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn words23_adaptive_over_limit_one_under_buffer() {
    for (min, max) in [(1, 1), (2, 2), (1, 1000)] {
        let api = Api::new(slow_once);
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_limits(min, max)
            .with_initial_limit(min)
            .pair();
        let mut svc = ServiceBuilder::new()
            .buffer(16)
            .layer(layer)
            .concurrency_limit(1)
            .service(api.clone());
        drive_kept(&mut svc, "kept", 30).await;
        drive_from_tasks(svc, 8, 10).await;
        let state = handle.state(HOST).unwrap();
        assert_eq!((state.in_flight(), state.waiting()), (0, 0), "{min}..{max}");
        assert_eq!(api.max_live(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn words23_full_stack_kept_from_tasks_under_buffer_and_limit_one() {
    let api = Api::new(slow_once);
    let (hl, hh) = hedge();
    let (cl, ch) = CoalesceLayer::new().pair();
    let (al, ah) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let mut svc = ServiceBuilder::new()
        .buffer(32)
        .concurrency_limit(1)
        .layer(cl)
        .layer(hl)
        .layer(al)
        .concurrency_limit(1)
        .service(api.clone());
    drive_kept(&mut svc, "kept", 40).await;
    drive_from_tasks(svc.clone(), 8, 10).await;
    // Identical calls from many tasks at once.
    let mut joins = Vec::new();
    for _ in 0..40 {
        let mut svc = svc.clone();
        joins.push(tokio::spawn(async move {
            let res = svc
                .ready()
                .await
                .unwrap()
                .call(get("/shared"))
                .await
                .unwrap();
            res.into_body().collect().await.unwrap().to_bytes()
        }));
    }
    for j in joins {
        assert_eq!(within("shared", j).await.unwrap(), "payload");
    }
    let state = ah.state(HOST).unwrap();
    assert_eq!((state.in_flight(), state.waiting()), (0, 0));
    assert_eq!(ch.in_flight(HOST), 0);
    let hs = hh.stats(HOST).unwrap();
    assert!(hs.hedge_wins() <= hs.hedges());
    assert_eq!(api.live(), 0);
}

// ---------- cancellation ----------

#[tokio::test(start_paused = true)]
async fn words23_hedge_dropped_at_each_await_point() {
    let api = Api::new(|uri, _| {
        if uri.contains("never") {
            Plan::Never
        } else {
            Plan::After(10)
        }
    });
    let (layer, handle) = hedge();
    let mut svc = layer.layer(api.clone());
    for i in 0..20 {
        within(
            "warm",
            svc.ready().await.unwrap().call(get(&format!("/w{i}"))),
        )
        .await
        .unwrap();
    }
    assert!(handle.stats(HOST).unwrap().delay().is_some());
    let before = api.started();

    // Before the first poll.
    let f = svc.ready().await.unwrap().call(get("/never/a"));
    drop(f);
    assert_eq!(api.live(), 0, "dropped before its first poll");

    // After the first poll.
    let mut f = spawn(svc.ready().await.unwrap().call(get("/never/b")));
    assert!(f.poll().is_pending());
    assert_eq!(api.live(), 1);
    drop(f);
    assert_eq!(api.live(), 0, "dropped after its first poll");

    // While hedged: both copies in flight.
    let mut f = spawn(svc.ready().await.unwrap().call(get("/never/c")));
    assert!(f.poll().is_pending());
    advance(Duration::from_millis(200)).await;
    assert!(f.poll().is_pending());
    assert_eq!(api.live(), 2, "the hedge is in flight");
    drop(f);
    assert_eq!(api.live(), 0, "a dropped call drops both copies");
    assert!(api.started() - before <= 4);

    let stats = handle.stats(HOST).unwrap();
    assert_eq!((stats.hedges(), stats.hedge_wins()), (1, 0));
    // The next calls still work.
    for i in 0..5 {
        within(
            "after",
            svc.ready().await.unwrap().call(get(&format!("/n{i}"))),
        )
        .await
        .unwrap();
    }
    assert_eq!(handle.stats(HOST).unwrap().hedges(), 1);
}

#[tokio::test(start_paused = true)]
async fn words23_coalesce_leader_dropped_before_poll_follower_answers() {
    let api = Api::new(|_, _| Plan::After(20));
    let (layer, handle) = CoalesceLayer::new().pair();
    let mut svc = layer.layer(api.clone());
    let leader = svc.ready().await.unwrap().call(get("/x"));
    let follower = svc.ready().await.unwrap().call(get("/x"));
    drop(leader);
    let res = within("follower of a dropped leader", follower)
        .await
        .unwrap();
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "payload"
    );
    let stats = handle.stats();
    assert_eq!((stats.calls(), stats.upstream(), stats.joined()), (2, 1, 1));
    assert_eq!(api.started(), 1);
    assert_eq!(handle.in_flight(HOST), 0);
}

#[tokio::test(start_paused = true)]
async fn words23_coalesce_leader_dropped_after_poll_follower_answers() {
    let api = Api::new(|_, _| Plan::After(20));
    let (layer, handle) = CoalesceLayer::new().pair();
    let mut svc = layer.layer(api.clone());
    let mut leader = spawn(svc.ready().await.unwrap().call(get("/x")));
    assert!(leader.poll().is_pending());
    let mut follower = spawn(svc.ready().await.unwrap().call(get("/x")));
    assert!(follower.poll().is_pending());
    advance(Duration::from_millis(5)).await;
    assert!(leader.poll().is_pending());
    drop(leader);
    let res = within("follower", follower).await.unwrap();
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "payload"
    );
    assert_eq!(api.started(), 1);
    assert_eq!(handle.in_flight(HOST), 0);
}

#[tokio::test(start_paused = true)]
async fn words23_coalesce_follower_dropped_leader_answers() {
    let api = Api::new(|_, _| Plan::After(20));
    let (layer, handle) = CoalesceLayer::new().pair();
    let mut svc = layer.layer(api.clone());
    let leader = svc.ready().await.unwrap().call(get("/x"));
    let mut follower = spawn(svc.ready().await.unwrap().call(get("/x")));
    assert!(follower.poll().is_pending());
    drop(follower);
    let dropped_unpolled = svc.ready().await.unwrap().call(get("/x"));
    drop(dropped_unpolled);
    let res = within("leader", leader).await.unwrap();
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "payload"
    );
    let stats = handle.stats();
    assert_eq!((stats.calls(), stats.upstream(), stats.joined()), (3, 1, 2));
    assert_eq!(api.started(), 1);
}

#[tokio::test(start_paused = true)]
async fn words23_coalesce_last_caller_leaving_cancels_and_next_starts_afresh() {
    // The first call of a URI never answers; later ones take 10 ms.
    let api = Api::new(|_, n| if n == 0 { Plan::Never } else { Plan::After(10) });
    let (layer, handle) = CoalesceLayer::new().pair();
    let mut svc = layer.layer(api.clone());
    let mut a = spawn(svc.ready().await.unwrap().call(get("/x")));
    let mut b = spawn(svc.ready().await.unwrap().call(get("/x")));
    assert!(a.poll().is_pending());
    assert!(b.poll().is_pending());
    advance(Duration::from_secs(1)).await;
    assert_eq!(api.live(), 1);
    assert_eq!(handle.in_flight(HOST), 1);
    drop(a);
    assert_eq!(api.live(), 1, "one caller is still waiting");
    drop(b);
    assert_eq!(
        api.live(),
        0,
        "the last caller left: the upstream call is dropped"
    );
    assert_eq!(handle.in_flight(HOST), 0);
    let res = within("fresh call", svc.ready().await.unwrap().call(get("/x")))
        .await
        .unwrap();
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "payload"
    );
    assert_eq!(handle.stats().upstream(), 2);
}

#[tokio::test(start_paused = true)]
async fn words23_adaptive_dropped_waiting_and_in_flight_calls_give_back() {
    let api = Api::new(|uri, _| {
        if uri.contains("never") {
            Plan::Never
        } else {
            Plan::After(10)
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let mut svc = layer.layer(api.clone());
    let mut a = spawn(svc.ready().await.unwrap().call(get("/never")));
    assert!(a.poll().is_pending());
    let mut b = spawn(svc.ready().await.unwrap().call(get("/b")));
    assert!(b.poll().is_pending());
    let mut c = spawn(svc.ready().await.unwrap().call(get("/c")));
    assert!(c.poll().is_pending());
    let st = handle.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (1, 2));
    drop(b);
    let st = handle.state(HOST).unwrap();
    assert_eq!(
        (st.in_flight(), st.waiting()),
        (1, 1),
        "a dropped waiter leaves the line"
    );
    drop(a);
    assert_eq!(api.live(), 0);
    let start = Instant::now();
    within("c after a was dropped", c).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let st = handle.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn words23_adaptive_dropped_before_first_poll_gives_permit_back() {
    let api = Api::new(|_, _| Plan::After(10));
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let mut svc = layer.layer(api.clone());
    for _ in 0..10 {
        let f = svc.ready().await.unwrap().call(get("/x"));
        drop(f);
    }
    let st = handle.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
    for _ in 0..3 {
        let res = within("after drops", svc.ready().await.unwrap().call(get("/x"))).await;
        if let Err(e) = &res {
            assert!(
                sturdy::core::find::<LimitReached>(&**e).is_none(),
                "a dropped call kept its permit: {e}"
            );
        }
        res.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn words23_hedge_over_adaptive_limit_one_and_dropped_while_waiting() {
    let api = Api::new(|uri, n| {
        if uri.contains("never") {
            Plan::Never
        } else if uri.contains("slow") && n == 0 {
            Plan::After(1_000)
        } else {
            Plan::After(10)
        }
    });
    let (hl, hh) = hedge();
    let (al, ah) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let mut svc = ServiceBuilder::new()
        .layer(hl)
        .layer(al)
        .service(api.clone());
    for i in 0..20 {
        within(
            "warm",
            svc.ready().await.unwrap().call(get(&format!("/w{i}"))),
        )
        .await
        .unwrap();
    }
    let start = Instant::now();
    within("slow", svc.ready().await.unwrap().call(get("/slow")))
        .await
        .unwrap();
    assert!(start.elapsed() <= Duration::from_millis(1_100));
    let st = ah.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
    assert_eq!(api.max_live(), 1, "the hedge waited for a place");

    let mut f = spawn(svc.ready().await.unwrap().call(get("/never")));
    assert!(f.poll().is_pending());
    advance(Duration::from_millis(200)).await;
    assert!(f.poll().is_pending());
    drop(f);
    let st = ah.state(HOST).unwrap();
    assert_eq!(
        (st.in_flight(), st.waiting()),
        (0, 0),
        "both copies gave back"
    );
    within("after", svc.ready().await.unwrap().call(get("/after")))
        .await
        .unwrap();
    let hs = hh.stats(HOST).unwrap();
    assert!(hs.hedge_wins() <= hs.hedges());
}

// ---------- hostile values ----------

#[tokio::test(start_paused = true)]
async fn words23_adaptive_max_wait_duration_max() {
    let api = Api::new(|_, _| Plan::After(50));
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::MAX)
        .pair();
    let svc = layer.layer(api.clone());
    let mut joins = Vec::new();
    for i in 0..5 {
        joins.push(tokio::spawn(svc.clone().oneshot(get(&format!("/{i}")))));
    }
    for j in joins {
        within("waiter with an unbounded wait", j)
            .await
            .unwrap()
            .unwrap();
    }
    let st = handle.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn words23_adaptive_extreme_limits() {
    let api = Api::new(|_, _| Plan::After(1));
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(0, 0).pair();
    within("zero", layer.layer(api.clone()).oneshot(get("/")))
        .await
        .unwrap();
    assert_eq!(handle.limit(HOST), Some(1), "a minimum of 0 is taken as 1");

    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(usize::MAX, usize::MAX)
        .with_initial_limit(usize::MAX)
        .pair();
    within("huge", layer.layer(api.clone()).oneshot(get("/")))
        .await
        .unwrap();
    assert_eq!(handle.limit(HOST), Some(1_000_000), "capped at 1,000,000");

    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let svc = layer.layer(api.clone());
    handle.set_limit(HOST, 0);
    assert_eq!(handle.limit(HOST), Some(1));
    within("after 0", svc.clone().oneshot(get("/")))
        .await
        .unwrap();
    handle.set_limit(HOST, usize::MAX);
    assert_eq!(handle.limit(HOST), Some(1_000));
    within("after max", svc.oneshot(get("/"))).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn words23_hedge_zero_delay_and_window() {
    let api = Api::new(|_, _| Plan::After(10));
    let (layer, handle) = HedgeLayer::new()
        .with_delay_bounds(Duration::ZERO, Duration::ZERO)
        .with_min_samples(0)
        .with_window(Duration::ZERO)
        .pair();
    let mut svc = layer.layer(api.clone());
    for i in 0..200 {
        within(
            "zero",
            svc.ready().await.unwrap().call(get(&format!("/{i}"))),
        )
        .await
        .unwrap();
    }
    let stats = handle.stats(HOST).unwrap();
    assert_eq!(stats.calls(), 200);
    assert!(
        stats.hedges() as f64 <= 0.05 * 200.0 + 10.0,
        "hedges stay below 5 % of calls + 10: {stats:?}"
    );
    assert_eq!(api.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn words23_hedge_max_delay_and_window() {
    let api = Api::new(slow_once);
    let (layer, handle) = HedgeLayer::new()
        .with_delay_bounds(Duration::MAX, Duration::MAX)
        .with_min_samples(1)
        .with_window(Duration::MAX)
        .pair();
    let mut svc = layer.layer(api.clone());
    for i in 0..40 {
        within(
            "warm",
            svc.ready().await.unwrap().call(get(&format!("/{i}"))),
        )
        .await
        .unwrap();
    }
    let start = Instant::now();
    within("slow", svc.ready().await.unwrap().call(get("/slow")))
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(1_000));
    assert_eq!(handle.stats(HOST).unwrap().hedges(), 0);
}

#[tokio::test(start_paused = true)]
async fn words23_hedge_budget_extremes() {
    let api = Api::new(slow_once);
    let (layer, handle) = HedgeLayer::new()
        .with_budget(0.0, 0)
        .unwrap()
        .with_min_samples(5)
        .pair();
    let mut svc = layer.layer(api.clone());
    drive_kept(&mut svc, "none", 60).await;
    assert_eq!(
        handle.stats(HOST).unwrap().hedges(),
        0,
        "no budget, no hedge"
    );

    let api = Api::new(slow_once);
    let (layer, handle) = HedgeLayer::new()
        .with_budget(1.0, u32::MAX)
        .unwrap()
        .with_min_samples(5)
        .pair();
    let mut svc = layer.layer(api.clone());
    drive_kept(&mut svc, "all", 60).await;
    let stats = handle.stats(HOST).unwrap();
    assert!(stats.hedges() >= 1 && stats.hedges() <= stats.calls());
    assert_eq!(api.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn words23_max_hosts_zero_on_each_layer() {
    let api = Api::new(|_, _| Plan::After(5));
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new().with_max_hosts(0))
        .layer(HedgeLayer::new().with_max_hosts(0).with_min_samples(1))
        .layer(AdaptiveConcurrencyLayer::new().with_max_hosts(0))
        .service(api.clone());
    for round in 0..3 {
        for h in 0..5 {
            let req = Request::get(format!("http://h{h}.example.com/{round}"))
                .body(Full::default())
                .unwrap();
            let res = within("host", svc.clone().oneshot(req)).await.unwrap();
            assert_eq!(
                res.into_body().collect().await.unwrap().to_bytes(),
                "payload"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn words23_coalesce_max_body_zero_and_max() {
    let api = Api::new(|_, _| Plan::After(20));
    let (layer, handle) = CoalesceLayer::new().with_max_body(0).pair();
    let svc = layer.layer(api.clone());
    let mut joins = Vec::new();
    for _ in 0..10 {
        joins.push(tokio::spawn(svc.clone().oneshot(get("/big"))));
    }
    for j in joins {
        let res = within("max body 0", j).await.unwrap().unwrap();
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "payload"
        );
    }
    let stats = handle.stats();
    assert_eq!(stats.too_large(), 1, "{stats:?}");
    assert_eq!(stats.fallbacks(), 9, "{stats:?}");
    assert_eq!(api.started(), 10);
    assert_eq!(handle.in_flight(HOST), 0);

    let api = Api::new(|_, _| Plan::After(20));
    let (layer, handle) = CoalesceLayer::new().with_max_body(usize::MAX).pair();
    let svc = layer.layer(api.clone());
    let mut joins = Vec::new();
    for _ in 0..10 {
        joins.push(tokio::spawn(svc.clone().oneshot(get("/big"))));
    }
    for j in joins {
        within("max body max", j).await.unwrap().unwrap();
    }
    assert_eq!(handle.stats().upstream(), 1);
}

#[tokio::test(start_paused = true)]
async fn words23_thousands_of_identical_calls_through_the_client() {
    let api = Api::new(|_, _| Plan::After(50));
    let (cl, ch) = CoalesceLayer::new().pair();
    let client = ClientBuilder::new()
        .with_hedge(HedgeLayer::new())
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_coalesce(cl)
        .build(api.clone());
    let mut joins = Vec::new();
    for _ in 0..3_000 {
        joins.push(tokio::spawn(client.clone().oneshot(get("/report"))));
    }
    for j in joins {
        let res = within("identical", j).await.unwrap().unwrap();
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "payload"
        );
    }
    assert_eq!(api.started(), 1);
    let stats = ch.stats();
    assert_eq!(
        (stats.calls(), stats.upstream(), stats.joined()),
        (3_000, 1, 2_999)
    );
}

#[tokio::test(start_paused = true)]
async fn words23_thousands_of_calls_through_adaptive_limit_one() {
    let api = Api::new(|_, _| Plan::After(1));
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::MAX)
        .pair();
    let svc = layer.layer(api.clone());
    let mut joins = Vec::new();
    for i in 0..2_000 {
        joins.push(tokio::spawn(svc.clone().oneshot(get(&format!("/{i}")))));
    }
    for j in joins {
        within("limited", j).await.unwrap().unwrap();
    }
    assert_eq!(api.max_live(), 1);
    assert_eq!(api.started(), 2_000);
    let st = handle.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

// ---------- Send + Sync + Clone ----------

fn send_sync_clone<T: Send + Sync + Clone + 'static>(_: &T) {}
fn send<T: Send>(_: &T) {}

#[tokio::test]
async fn words23_services_layers_and_client_are_send_sync_clone() {
    let api = Api::new(|_, _| Plan::After(1));
    let (hl, hh) = HedgeLayer::new().pair();
    let (cl, ch) = CoalesceLayer::new().pair();
    let (al, ah) = AdaptiveConcurrencyLayer::new().pair();
    send_sync_clone(&hl);
    send_sync_clone(&cl);
    send_sync_clone(&al);
    send_sync_clone(&hh);
    send_sync_clone(&ch);
    send_sync_clone(&ah);
    let mut h = hl.layer(api.clone());
    let mut c = cl.layer(api.clone());
    let mut a = al.layer(api.clone());
    send_sync_clone(&h);
    send_sync_clone(&c);
    send_sync_clone(&a);
    let fh = h.call(get("/"));
    let fc = c.call(get("/"));
    let fa = a.call(get("/"));
    send(&fh);
    send(&fc);
    send(&fa);
    let client = ClientBuilder::new()
        .with_hedge(hl)
        .with_adaptive_concurrency(al)
        .with_coalesce(cl)
        .build(api);
    send_sync_clone(&client);
    fh.await.unwrap();
    fc.await.unwrap();
    fa.await.unwrap();
}
