//! A call whose inner `call` panics gives its permit back, on the fast path and after waiting in
//! line. Paused time, in-process service.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use sturdy_concurrency::AdaptiveConcurrencyLayer;
use sturdy_core::BoxError;
use tower::{Layer, Service, ServiceExt};

/// Call 0 panics inside `call`; call 1 answers once `gate` is notified; call 2 panics; later
/// calls answer 200 at once.
#[derive(Clone, Default)]
struct Api {
    calls: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Notify>,
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
        match self.calls.fetch_add(1, Ordering::SeqCst) {
            0 | 2 => panic!("the inner service failed inside call"),
            1 => {
                let gate = self.gate.clone();
                Box::pin(async move {
                    gate.notified().await;
                    Ok(Response::new(()))
                })
            }
            _ => Box::pin(async { Ok(Response::new(())) }),
        }
    }
}

fn get() -> Request<()> {
    Request::get("http://a/x").body(()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_inner_call_panics_gives_its_permit_back() {
    let api = Api::default();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .with_max_wait(Duration::from_secs(5))
        .pair();
    let svc = layer.layer(api.clone());
    // Fast path: the permit is taken, then the inner call panics.
    let first = tokio::spawn(svc.clone().oneshot(get()));
    assert!(first.await.unwrap_err().is_panic());
    assert_eq!(handle.state("a").unwrap().in_flight(), 0);
    // Slow path: one call holds the only permit, the next waits, gets it, and panics in call.
    let holder = tokio::spawn(svc.clone().oneshot(get()));
    tokio::task::yield_now().await;
    let waiter = tokio::spawn(svc.clone().oneshot(get()));
    tokio::task::yield_now().await;
    assert_eq!(handle.state("a").unwrap().waiting(), 1);
    api.gate.notify_one();
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    assert!(waiter.await.unwrap_err().is_panic());
    let s = handle.state("a").unwrap();
    assert_eq!((s.in_flight(), s.waiting()), (0, 0));
    let res = tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(get()))
        .await
        .expect("the permit came back: no wait")
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// Answers once `gate` is notified; its `Clone` panics while `panic_on_clone` is set.
struct Brittle {
    gate: Arc<tokio::sync::Notify>,
    panic_on_clone: Arc<std::sync::atomic::AtomicBool>,
}

impl Clone for Brittle {
    fn clone(&self) -> Self {
        assert!(
            !self.panic_on_clone.load(Ordering::SeqCst),
            "the inner service failed inside clone"
        );
        Self {
            gate: self.gate.clone(),
            panic_on_clone: self.panic_on_clone.clone(),
        }
    }
}

impl Service<Request<()>> for Brittle {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Answer {
        let gate = self.gate.clone();
        Box::pin(async move {
            gate.notified().await;
            Ok(Response::new(()))
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_inner_clone_panics_as_it_begins_to_wait_is_not_left_counted() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let panic_on_clone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .with_max_wait(Duration::from_secs(5))
        .pair();
    let mut svc = layer.layer(Brittle {
        gate: gate.clone(),
        panic_on_clone: panic_on_clone.clone(),
    });
    // One call holds the only permit.
    let holder = tokio::spawn(svc.clone().oneshot(get()));
    tokio::task::yield_now().await;
    // The next has to wait: the layer takes the ready inner service (a clone stays behind),
    // and that clone panics.
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    panic_on_clone.store(true, Ordering::SeqCst);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(svc.call(get()));
    }));
    panic_on_clone.store(false, Ordering::SeqCst);
    assert!(caught.is_err());
    assert_eq!(handle.state("a").unwrap().waiting(), 0);
    gate.notify_one();
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    let s = handle.state("a").unwrap();
    assert_eq!((s.in_flight(), s.waiting()), (0, 0));
}
