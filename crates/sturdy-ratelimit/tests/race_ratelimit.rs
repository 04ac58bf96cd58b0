//! Waits and places that must be bounded or given back on every path: a slow-start waiter held
//! behind a released call that never answers, a released call whose inner `call` panics, and a
//! remote grant whose caller is dropped while the store's answer is on its way. Paused time,
//! in-process services; every wait is bounded so a stuck call fails the test instead of hanging.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use sturdy_core::{BoxError, RateLimited};
use sturdy_ratelimit::{BoxFuture, RateLimitLayer, RemoteQuota, Reserve};
use tower::{Layer, Service, ServiceExt};

fn get() -> Request<()> {
    Request::get("http://a/orders").body(()).unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// What the scripted API does with one call.
#[derive(Clone, Copy)]
enum Act {
    /// 429 with `Retry-After: 1`.
    Pause,
    /// 200.
    Ok,
    /// An answer that never comes (a hung upstream with no timeout below the limiter).
    Hang,
    /// `call` itself panics.
    Panic,
}

/// Answers the n-th call with `script[n]`, then 200.
#[derive(Clone)]
struct Api {
    script: Arc<Vec<Act>>,
    calls: Arc<AtomicUsize>,
}

impl Api {
    fn new(script: Vec<Act>) -> Self {
        Self {
            script: Arc::new(script),
            calls: Arc::default(),
        }
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

impl Service<Request<()>> for Api {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Answer {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        match self.script.get(n).copied().unwrap_or(Act::Ok) {
            Act::Pause => Box::pin(async {
                Ok(Response::builder()
                    .status(429)
                    .header("retry-after", "1")
                    .body(())
                    .unwrap())
            }),
            Act::Ok => Box::pin(async { Ok(Response::new(())) }),
            Act::Hang => Box::pin(std::future::pending()),
            Act::Panic => panic!("the inner service failed inside call"),
        }
    }
}

/// Lets spawned tasks run until they wait on something.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// `RateLimitLayer::with_max_wait`: "The longest a call waits for its turn (a slot, the end of a
/// pause); a call that would wait longer fails at once with `RateLimited`". Under slow start the
/// second waiter is held until the first released call answers; when that answer never comes,
/// the waiter must still leave at its `max_wait`, not wait for the upstream.
#[tokio::test(start_paused = true)]
async fn a_slow_start_waiter_behind_a_hung_released_call_still_leaves_at_max_wait() {
    let api = Api::new(vec![Act::Pause, Act::Hang]);
    let svc = RateLimitLayer::adaptive_only()
        .with_max_wait(secs(5))
        .layer(api.clone());
    // The 429 pauses the key for 1 s.
    let first = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(first.status(), 429);
    // Two calls wait in line for the pause to end.
    let released = tokio::spawn(svc.clone().oneshot(get()));
    settle().await;
    let behind = tokio::spawn(svc.clone().oneshot(get()));
    settle().await;
    // The pause ends: slow start lets the first out (it hangs upstream); the second waits for
    // the window, which only an answer opens.
    tokio::time::advance(Duration::from_millis(1_001)).await;
    settle().await;
    assert_eq!(api.calls.load(Ordering::SeqCst), 2, "one call released");
    let outcome = tokio::time::timeout(secs(60), behind).await;
    let Ok(joined) = outcome else {
        panic!(
            "the call behind a hung released call was still waiting 60 s after it joined the \
             line, though its max_wait is 5 s"
        );
    };
    let err = joined.unwrap().unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    // How long the window stays full is not known: the default pause is the suggestion.
    assert_eq!(limited.retry_after(), secs(1), "{err}");
    released.abort();
}

/// A released call holds a place in the slow-start window "given back when it finishes ... or is
/// dropped". When the inner service's `call` panics right after the release (the panic unwinds
/// through the response future, which is then dropped), the place must go back too, or the
/// window stays full and the key lets nobody out of its line again.
#[tokio::test(start_paused = true)]
async fn a_released_call_whose_inner_call_panics_gives_its_slow_start_place_back() {
    let api = Api::new(vec![Act::Pause, Act::Panic]);
    let svc = RateLimitLayer::adaptive_only()
        .with_max_wait(secs(5))
        .layer(api.clone());
    let first = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(first.status(), 429);
    let panicking = tokio::spawn(svc.clone().oneshot(get()));
    settle().await;
    let behind = tokio::spawn(svc.clone().oneshot(get()));
    settle().await;
    tokio::time::advance(Duration::from_millis(1_001)).await;
    assert!(panicking.await.unwrap_err().is_panic());
    let outcome = tokio::time::timeout(secs(60), behind).await;
    let Ok(joined) = outcome else {
        panic!(
            "the call behind a released call that panicked was never let out: the panicked \
             call's place in the slow-start window was not given back"
        );
    };
    let res = joined.unwrap().expect(
        "the call behind a released call that panicked should go once the panicked call's \
         place is given back",
    );
    assert_eq!(res.status(), 200);
    assert_eq!(api.calls.load(Ordering::SeqCst), 3);
}

/// A store whose reservation is made when the request is sent (the first poll, as a Redis
/// script runs once its command is written) and whose answer (a grant) arrives 10 ms later.
#[derive(Debug, Default)]
struct InFlightStore {
    granted: AtomicUsize,
    released: AtomicUsize,
}

struct Sent {
    store: Arc<InFlightStore>,
    sent: bool,
    answer: Pin<Box<tokio::time::Sleep>>,
}

impl Future for Sent {
    type Output = Result<Reserve, BoxError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.sent {
            self.sent = true;
            // The store reserved the slot; its answer is on the wire for 10 ms.
            self.store.granted.fetch_add(1, Ordering::SeqCst);
        }
        std::task::ready!(self.answer.as_mut().poll(cx));
        Poll::Ready(Ok(Reserve::Granted {
            wait: Duration::ZERO,
        }))
    }
}

#[derive(Debug, Clone)]
struct Shared(Arc<InFlightStore>);

impl RemoteQuota for Shared {
    fn reserve(&self, _key: &str, _max_wait: Duration) -> BoxFuture<Result<Reserve, BoxError>> {
        Box::pin(Sent {
            store: self.0.clone(),
            sent: false,
            answer: Box::pin(tokio::time::sleep(Duration::from_millis(10))),
        })
    }

    fn release(&self, _key: &str) -> BoxFuture<Result<(), BoxError>> {
        self.0.released.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The response future's docs: "Dropping it while it waits gives its place back: ... a slot a
/// remote store granted it is released", and the guide: "A call that waited for a Redis slot and
/// was dropped ... gives the slot back". A call dropped while the store's grant is on its way
/// (a timeout above the limiter during a slow round trip) never learns of the grant, so nothing
/// gives it back: the slot is lost to every process sharing the quota.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_the_store_answers_gives_the_granted_slot_back() {
    let store = Arc::new(InFlightStore::default());
    let layer = RateLimitLayer::new(sturdy_ratelimit::Quota::per_second(10).unwrap())
        .with_remote(Arc::new(Shared(store.clone())));
    let mut svc = layer.layer(Api::new(vec![]));
    let mut fut = tokio_test::task::spawn(svc.ready().await.unwrap().call(get()));
    tokio_test::assert_pending!(fut.poll());
    assert_eq!(
        store.granted.load(Ordering::SeqCst),
        1,
        "the store was asked"
    );
    // The caller gives up while the answer is on its way.
    drop(fut);
    // Let whatever the layer does in the background run (and the answer arrive).
    tokio::time::sleep(secs(1)).await;
    settle().await;
    assert_eq!(
        store.released.load(Ordering::SeqCst),
        1,
        "the slot the store granted to a call dropped during the round trip was not given back"
    );
}

/// A store that grants every call the latest slot it may (`max_wait` from the ask), answering
/// after a 10 ms round trip; counts releases.
#[derive(Debug, Clone, Default)]
struct AtTheEdge(Arc<AtomicUsize>);

impl RemoteQuota for AtTheEdge {
    fn reserve(&self, _key: &str, max_wait: Duration) -> BoxFuture<Result<Reserve, BoxError>> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(Reserve::Granted { wait: max_wait })
        })
    }

    fn release(&self, _key: &str) -> BoxFuture<Result<(), BoxError>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A grant of exactly `max_wait`, counted from the ask, keeps the store's contract even though
/// the answer took a round trip: the call goes at the granted time, and nothing is released.
#[tokio::test(start_paused = true)]
async fn a_grant_at_the_edge_of_max_wait_after_a_round_trip_is_used() {
    let store = AtTheEdge::default();
    let api = Api::new(vec![]);
    let svc = RateLimitLayer::new(sturdy_ratelimit::Quota::per_second(10).unwrap())
        .with_max_wait(secs(2))
        .with_remote(Arc::new(store.clone()))
        .layer(api.clone());
    let start = tokio::time::Instant::now();
    let res = svc.oneshot(get()).await.expect("the grant is used");
    assert_eq!(res.status(), 200);
    let waited = start.elapsed();
    assert!(
        waited >= secs(2) && waited <= secs(2) + Duration::from_millis(20),
        "waited {waited:?}"
    );
    assert_eq!(store.0.load(Ordering::SeqCst), 0, "nothing was given back");
}

/// A store that decides when `reserve` is called (before its future is polled), granting at
/// once; counts grants and releases.
#[derive(Debug, Clone, Default)]
struct Eager(Arc<InFlightStore>);

impl RemoteQuota for Eager {
    fn reserve(&self, _key: &str, _max_wait: Duration) -> BoxFuture<Result<Reserve, BoxError>> {
        self.0.granted.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::ready(Ok(Reserve::Granted {
            wait: Duration::ZERO,
        })))
    }

    fn release(&self, _key: &str) -> BoxFuture<Result<(), BoxError>> {
        self.0.released.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A response future dropped before its first poll gives back a slot a store granted when it was
/// asked (at `call`), not only one granted during a poll.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_before_its_first_poll_gives_an_eager_grant_back() {
    let store = Eager::default();
    let layer = RateLimitLayer::new(sturdy_ratelimit::Quota::per_second(10).unwrap())
        .with_remote(Arc::new(store.clone()));
    let mut svc = layer.layer(Api::new(vec![]));
    let fut = svc.ready().await.unwrap().call(get());
    assert_eq!(
        store.0.granted.load(Ordering::SeqCst),
        1,
        "the store was asked at call"
    );
    drop(fut);
    settle().await;
    assert_eq!(
        store.0.released.load(Ordering::SeqCst),
        1,
        "the slot granted to a call never polled was not given back"
    );
}
