//! s40: a bare `HedgeLayer` over a layer of our own that marks its wait with
//! `sturdy_core::hold::AttemptHold` (docs/guides/hedge.md, "When"; crates/sturdy-hedge/CHANGELOG.md,
//! Unreleased; the rustdoc of `sturdy_core::hold`), on paused time.

#![cfg(feature = "full")]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use sturdy::core::BoxError;
use sturdy::hedge::{HedgeHandle, HedgeLayer};
use sturdy_core::hold::{AttemptHold, HeldFor};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::buffer::Buffer;
use tower::{Service, ServiceBuilder, ServiceExt};

const URL: &str = "http://api.example.com/x";
const HOST: &str = "api.example.com";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

struct InFlight(Arc<AtomicUsize>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the held service saw: the start of each request at the "server", the marks.
#[derive(Clone)]
struct Api {
    gate: watch::Sender<bool>,
    starts: Arc<Mutex<Vec<Instant>>>,
    /// Futures alive (held or at the server).
    in_flight: Arc<AtomicUsize>,
    /// Requests that waited on the gate.
    held: Arc<AtomicUsize>,
    /// Per request that reached the server: its method and whether it carried an AttemptHold.
    marks: Arc<Mutex<Vec<(http::Method, Option<AttemptHold>)>>>,
    script: Arc<dyn Fn(usize) -> u64 + Send + Sync>,
}

impl Api {
    fn new(script: impl Fn(usize) -> u64 + Send + Sync + 'static) -> Self {
        Self {
            gate: watch::channel(true).0,
            starts: Arc::default(),
            in_flight: Arc::default(),
            held: Arc::default(),
            marks: Arc::default(),
            script: Arc::new(script),
        }
    }
    fn close(&self) {
        self.gate.send_replace(false);
    }
    fn open(&self) {
        self.gate.send_replace(true);
    }
    fn started(&self) -> usize {
        self.starts.lock().unwrap().len()
    }
    fn start(&self, i: usize) -> Instant {
        self.starts.lock().unwrap()[i]
    }
}

/// A layer of our own that holds a request while the gate is closed, marking the wait as the
/// docs say ("A layer of your own that holds calls back can mark them the same way"), then
/// answers after `script(n)` ms.
impl Service<Request<()>> for Api {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        let me = self.clone();
        me.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(me.in_flight.clone());
        Box::pin(async move {
            let _guard = guard;
            let mut rx = me.gate.subscribe();
            if !*rx.borrow() {
                me.held.fetch_add(1, Ordering::SeqCst);
                let mark = AttemptHold::of(&req);
                if let Some(m) = &mark {
                    m.hold(HeldFor::RateLimit);
                }
                rx.wait_for(|open| *open).await.unwrap();
                if let Some(m) = &mark {
                    m.release();
                }
            }
            let n = {
                let mut s = me.starts.lock().unwrap();
                s.push(Instant::now());
                s.len() - 1
            };
            me.marks
                .lock()
                .unwrap()
                .push((req.method().clone(), AttemptHold::of(&req)));
            tokio::time::sleep(ms((me.script)(n))).await;
            Ok(Response::new(()))
        })
    }
}

type Svc = tower::util::BoxCloneService<Request<()>, Response<()>, BoxError>;

/// Requests 0..5 take 10 ms (the warm-up), 5 and later `later` ms.
fn setup(later: u64) -> (Svc, Api, HedgeHandle) {
    let api = Api::new(move |i| if i < 5 { 10 } else { later });
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(5)
        .with_budget(0.0, 1)
        .unwrap()
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(api.clone());
    (tower::util::BoxCloneService::new(svc), api, handle)
}

async fn warm(svc: &Svc, handle: &HedgeHandle) -> Duration {
    for _ in 0..5 {
        svc.clone().oneshot(get(URL)).await.unwrap();
    }
    handle.stats(HOST).unwrap().delay().expect("a delay")
}

fn hedges(handle: &HedgeHandle) -> u64 {
    handle.stats(HOST).unwrap().hedges()
}

/// With one token (ratio 0, burst 1): a slow call is hedged iff the token is still there.
async fn slow_call_hedges(svc: &Svc, api: &Api) -> bool {
    let before = api.started();
    svc.clone().oneshot(get(URL)).await.unwrap();
    api.started() - before == 2
}

/// hedge.md: "A call whose first copy a layer below still holds back when the hedge comes due
/// ... is not hedged while it waits ... and no token is spent meanwhile".
#[tokio::test(start_paused = true)]
async fn s40_held_past_the_delay_is_not_hedged_and_spends_no_token() {
    // 5: the held call, fast once let go; 6 and later: slow.
    let api = Api::new(|i| match i {
        0..=4 => 10,
        5 => 2,
        _ => 1_000,
    });
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(5)
        .with_budget(0.0, 1)
        .unwrap()
        .pair();
    let svc: Svc =
        tower::util::BoxCloneService::new(ServiceBuilder::new().layer(layer).service(api.clone()));
    let d = warm(&svc, &handle).await;
    api.close();
    let call = tokio::spawn(svc.clone().oneshot(get(URL)));
    tokio::time::sleep(d * 20).await;
    assert_eq!(api.held.load(Ordering::SeqCst), 1, "the first copy is held");
    assert_eq!(api.started(), 5, "nothing reached the server");
    assert_eq!(hedges(&handle), 0, "not hedged while held");
    api.open();
    call.await.unwrap().unwrap();
    assert_eq!(api.started(), 6, "the server saw one request");
    assert_eq!(
        api.held.load(Ordering::SeqCst),
        1,
        "no second copy was held"
    );
    assert_eq!(hedges(&handle), 0);
    assert!(
        slow_call_hedges(&svc, &api).await,
        "the only token was not spent"
    );
    assert_eq!(hedges(&handle), 1);
}

/// hedge.md: "once the first copy has been let go, one more delay passes before the hedge is
/// sent": no earlier than one delay after it was let go, no later than about two.
#[tokio::test(start_paused = true)]
async fn s40_held_then_slow_is_hedged_one_to_two_delays_after_let_go() {
    let (svc, api, handle) = setup(1_000);
    let d = warm(&svc, &handle).await;
    api.close();
    let call = tokio::spawn(svc.clone().oneshot(get(URL)));
    tokio::time::sleep(d * 10 + d / 3).await;
    assert_eq!(hedges(&handle), 0);
    let let_go = Instant::now();
    api.open();
    call.await.unwrap().unwrap();
    assert_eq!(api.started(), 7, "first copy and hedge");
    assert_eq!(hedges(&handle), 1);
    let first = api.start(5) - let_go;
    let hedge = api.start(6) - let_go;
    assert!(first <= ms(1), "first copy went at once: {first:?}");
    assert!(
        hedge >= d && hedge <= 2 * d + ms(1),
        "hedge {hedge:?} after let go, delay {d:?}"
    );
}

/// hedge.md: "The delay still counts from the call's start: a first copy held for less than the
/// delay and let go before it is hedged on time."
#[tokio::test(start_paused = true)]
async fn s40_short_hold_is_hedged_on_time() {
    let (svc, api, handle) = setup(1_000);
    let d = warm(&svc, &handle).await;
    api.close();
    let t0 = Instant::now();
    let call = tokio::spawn(svc.clone().oneshot(get(URL)));
    tokio::time::sleep(d / 2).await;
    api.open();
    call.await.unwrap().unwrap();
    assert_eq!(hedges(&handle), 1);
    let hedge = api.start(6) - t0;
    assert!(
        hedge >= d && hedge <= d + ms(1),
        "hedge {hedge:?} after the call's start, delay {d:?}"
    );
}

/// Cancellation while held: the token is back (a later slow call is hedged), nothing in flight.
#[tokio::test(start_paused = true)]
async fn s40_dropped_while_held_leaves_nothing_behind() {
    let (svc, api, handle) = setup(1_000);
    let d = warm(&svc, &handle).await;
    api.close();
    let call = tokio::spawn(svc.clone().oneshot(get(URL)));
    tokio::time::sleep(d * 5).await;
    call.abort();
    let _ = call.await;
    tokio::time::sleep(d * 5).await;
    assert_eq!(api.in_flight.load(Ordering::SeqCst), 0, "nothing in flight");
    api.open();
    tokio::time::sleep(d * 5).await;
    assert_eq!(api.started(), 5, "nothing was sent");
    assert_eq!(hedges(&handle), 0);
    assert!(slow_call_hedges(&svc, &api).await, "the token is there");
    assert_eq!(hedges(&handle), 1);
    assert!(!slow_call_hedges(&svc, &api).await, "only one token");
    assert_eq!(api.in_flight.load(Ordering::SeqCst), 0);
}

/// Cancellation while the re-armed hedge timer waits (let go, slow, within one delay after).
#[tokio::test(start_paused = true)]
async fn s40_dropped_while_rearmed_timer_waits_leaves_nothing_behind() {
    let (svc, api, handle) = setup(1_000);
    let d = warm(&svc, &handle).await;
    api.close();
    let call = tokio::spawn(svc.clone().oneshot(get(URL)));
    tokio::time::sleep(d * 5 + d / 3).await;
    api.open();
    tokio::time::sleep(d / 2).await;
    assert_eq!(api.started(), 6, "first copy out, hedge not yet");
    call.abort();
    let _ = call.await;
    tokio::time::sleep(d * 5).await;
    assert_eq!(api.started(), 6, "no hedge after the drop");
    assert_eq!(api.in_flight.load(Ordering::SeqCst), 0, "nothing in flight");
    assert_eq!(hedges(&handle), 0);
    assert!(slow_call_hedges(&svc, &api).await, "the token is there");
    assert!(!slow_call_hedges(&svc, &api).await, "only one token");
}

/// hedge.md: "the hedge layer puts one on each call it may hedge": the inner service sees an
/// `AttemptHold` on a GET once the host has a delay; a POST (never hedged) passes "untouched".
#[tokio::test(start_paused = true)]
async fn s40_inner_service_sees_the_mark_on_hedgeable_calls_only() {
    let (svc, api, handle) = setup(5);
    warm(&svc, &handle).await;
    api.marks.lock().unwrap().clear();
    svc.clone().oneshot(get(URL)).await.unwrap();
    let post = Request::post(URL).body(()).unwrap();
    svc.clone().oneshot(post).await.unwrap();
    let marks = api.marks.lock().unwrap();
    assert_eq!(marks[0].0, http::Method::GET);
    let m = marks[0].1.as_ref().expect("a GET carries a mark");
    assert_eq!(m.deadline(), None, "the hedge layer's mark has no deadline");
    assert_eq!(m.held_for(), None);
    assert_eq!(marks[1].0, http::Method::POST);
    assert!(
        marks[1].1.is_none(),
        "a POST carries no mark: {:?}",
        marks[1]
    );
}

/// A mark already on the request (as the retry layer puts one) is kept, not replaced: the inner
/// service sees the same deadline, and a hold there is seen on the caller's mark.
#[tokio::test(start_paused = true)]
async fn s40_a_mark_already_there_is_kept() {
    let (svc, api, handle) = setup(5);
    warm(&svc, &handle).await;
    api.marks.lock().unwrap().clear();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mine = AttemptHold::until(deadline);
    let mut req = get(URL);
    req.extensions_mut().insert(mine.clone());
    svc.clone().oneshot(req).await.unwrap();
    let marks = api.marks.lock().unwrap();
    let seen = marks[0].1.as_ref().expect("a mark");
    assert_eq!(seen.deadline(), Some(deadline));
    seen.hold(HeldFor::Token);
    assert_eq!(mine.held_for(), Some(HeldFor::Token), "the same mark");
    seen.release();
}

/// Composition: under `tower::buffer::Buffer`, driven as a kept service
/// (`ready().await?.call(req)`): held past the delay, not hedged; let go and slow, hedged one to
/// two delays later.
#[tokio::test(start_paused = true)]
async fn s40_under_buffer_as_a_kept_service() {
    let (inner, api, handle) = setup(1_000);
    let d = warm(&inner, &handle).await;
    let buf = Buffer::new(inner, 8);
    let mut kept = buf.clone();
    api.close();
    let call = tokio::spawn(async move {
        let fut = kept.ready().await?.call(get(URL));
        fut.await
    });
    tokio::time::sleep(d * 10 + d / 3).await;
    assert_eq!(api.started(), 5);
    assert_eq!(hedges(&handle), 0, "not hedged while held under Buffer");
    let let_go = Instant::now();
    api.open();
    call.await.unwrap().unwrap();
    assert_eq!(api.started(), 7);
    assert_eq!(hedges(&handle), 1);
    let hedge = api.start(6) - let_go;
    assert!(
        hedge >= d && hedge <= 2 * d + ms(1),
        "hedge {hedge:?} after let go, delay {d:?}"
    );
}
