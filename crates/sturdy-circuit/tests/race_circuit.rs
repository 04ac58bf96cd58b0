//! A half-open probe whose inner `call` panics gives its probe slot back (the permit is dropped
//! while the panic unwinds), so the breaker can still be probed. Paused time, in-process service.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use sturdy_circuit::{CircuitBreakerLayer, CircuitState};
use sturdy_core::BoxError;
use tower::{Layer, Service, ServiceExt};

/// Call 0 answers 500, call 1 panics inside `call`, later calls answer 200.
#[derive(Clone, Default)]
struct Api(Arc<AtomicUsize>);

type Answer = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

impl Service<Request<()>> for Api {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Answer {
        match self.0.fetch_add(1, Ordering::SeqCst) {
            0 => Box::pin(async { Ok(Response::builder().status(500).body(()).unwrap()) }),
            1 => panic!("the inner service failed inside call"),
            _ => Box::pin(async { Ok(Response::new(())) }),
        }
    }
}

fn get() -> Request<()> {
    Request::get("http://a/x").body(()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_probe_whose_inner_call_panics_gives_its_slot_back() {
    let api = Api::default();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let svc = layer.layer(api.clone());
    assert_eq!(svc.clone().oneshot(get()).await.unwrap().status(), 500);
    assert!(matches!(handle.state("a"), Some(CircuitState::Open { .. })));
    tokio::time::advance(Duration::from_secs(1)).await;
    let probe = tokio::spawn(svc.clone().oneshot(get()));
    assert!(probe.await.unwrap_err().is_panic());
    assert_eq!(handle.state("a"), Some(CircuitState::HalfOpen));
    // The slot came back: the next call is the probe, and its success closes the breaker.
    let res = svc
        .clone()
        .oneshot(get())
        .await
        .expect("admitted as the probe");
    assert_eq!(res.status(), 200);
    assert_eq!(handle.state("a"), Some(CircuitState::Closed));
    assert_eq!(api.0.load(Ordering::SeqCst), 3);
}
