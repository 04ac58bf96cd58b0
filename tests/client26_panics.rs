//! An inner service that panics, in its `call` or while its future is polled, must not keep what
//! the call held: the breaker's half-open probe slot (circuit.md: "A probe whose future is
//! dropped gives its slot back"), a place under the adaptive limit (concurrency.md: "a dropped
//! call in flight gives its permit back"), a place in the rate limiter's release window
//! (ratelimit.md: "a released call gives its place back when it finishes, fails, is dropped or
//! panics"), a place in a hedged call. Paused time; each panic is caught by `tokio::spawn`.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::BoxError;
use sturdy::ratelimit::RateLimitLayer;
use tower::{Layer, Service, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

/// Where the scripted panic happens.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Where {
    /// In `Service::call` itself.
    Call,
    /// In the response future's first poll.
    Poll,
}

/// Answers the path `/status/N` with N; `/panic` panics where `at` says.
#[derive(Clone)]
struct Api {
    at: Where,
    calls: Arc<AtomicU32>,
}

impl Service<Req> for Api {
    type Response = Res;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Res, BoxError>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Req) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let path = req.uri().path().to_string();
        if path == "/panic" && self.at == Where::Call {
            panic!("scripted panic in call");
        }
        Box::pin(async move {
            if path == "/panic" {
                panic!("scripted panic in poll");
            }
            let status: u16 = path
                .strip_prefix("/status/")
                .and_then(|s| s.parse().ok())
                .unwrap_or(200);
            if path.starts_with("/slow") {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(Response::builder()
                .status(status)
                .body(Full::default())
                .unwrap())
        })
    }
}

fn req(path: &str) -> Req {
    Request::get(format!("http://api.test{path}"))
        .body(Full::default())
        .unwrap()
}

async fn panics<S>(svc: S, r: Req) -> bool
where
    S: Service<Req, Response = Res> + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Future: Send,
{
    let j = tokio::spawn(async move {
        let _ = svc.oneshot(r).await;
    });
    j.await.is_err_and(|e| e.is_panic())
}

#[tokio::test(start_paused = true)]
async fn client26_a_probe_that_panics_gives_its_slot_back() {
    for at in [Where::Call, Where::Poll] {
        let api = Api {
            at,
            calls: Arc::default(),
        };
        let (layer, h) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
            .pair();
        let svc = layer.layer(api.clone());
        let _ = svc.clone().oneshot(req("/status/503")).await.unwrap();
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(panics(svc.clone(), req("/panic")).await, "{at:?}");
        // The probe is gone: a call now is the next probe (not refused as `Probing` forever).
        let mut admitted = false;
        for _ in 0..3 {
            match svc.clone().oneshot(req("/status/200")).await {
                Ok(res) => {
                    assert_eq!(res.status(), 200);
                    admitted = true;
                    break;
                }
                Err(e) => {
                    // A failed probe (the panic) may reopen it: wait out that period.
                    let _ = e;
                    tokio::time::advance(Duration::from_millis(1001)).await;
                }
            }
        }
        assert!(
            admitted,
            "{at:?}: every call refused after a probe panicked: {:?}",
            h.state("api.test")
        );
        assert_eq!(h.state("api.test"), Some(CircuitState::Closed), "{at:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn client26_a_call_that_panics_gives_its_concurrency_place_back() {
    for at in [Where::Call, Where::Poll] {
        let api = Api {
            at,
            calls: Arc::default(),
        };
        let (layer, h) = AdaptiveConcurrencyLayer::new()
            .with_limits(1, 1)
            .with_max_wait(Duration::ZERO)
            .pair();
        let svc = layer.layer(api.clone());
        for _ in 0..3 {
            assert!(panics(svc.clone(), req("/panic")).await, "{at:?}");
        }
        let r = svc.clone().oneshot(req("/status/200")).await;
        assert!(
            r.is_ok(),
            "{at:?}: the place was kept by a call that panicked: {:?} ({:?})",
            r.err().map(|e| e.to_string()),
            h.state("api.test")
        );
        assert_eq!(h.state("api.test").map(|s| s.in_flight()), Some(0));
    }
}

#[tokio::test(start_paused = true)]
async fn client26_a_released_call_that_panics_gives_its_window_place_back() {
    for at in [Where::Call, Where::Poll] {
        let api = Api {
            at,
            calls: Arc::default(),
        };
        let (layer, h) = RateLimitLayer::adaptive_only()
            .with_max_wait(Duration::from_secs(20))
            .pair();
        let svc = layer.layer(api.clone());
        // A bare 429 pauses the host 1 s; then slow start lets one call out at a time.
        let _ = svc.clone().oneshot(req("/status/429")).await.unwrap();
        assert!(h.pause("api.test").is_some());
        let first = tokio::spawn(svc.clone().oneshot(req("/panic")));
        tokio::task::yield_now().await;
        let second = tokio::spawn(svc.clone().oneshot(req("/status/200")));
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_millis(1100)).await;
        let p = first.await;
        assert!(p.is_err_and(|e| e.is_panic()), "{at:?}");
        let r = tokio::time::timeout(Duration::from_secs(30), second).await;
        let ok = matches!(r, Ok(Ok(Ok(ref res))) if res.status() == 200);
        assert!(
            ok,
            "{at:?}: the call behind a released call that panicked: {r:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn client26_a_panicking_copy_under_the_hedge_leaves_nothing_held() {
    use sturdy::hedge::HedgeLayer;
    let api = Api {
        at: Where::Poll,
        calls: Arc::default(),
    };
    let (cl, ch) = AdaptiveConcurrencyLayer::new()
        .with_limits(2, 2)
        .with_max_wait(Duration::ZERO)
        .pair();
    let (hl, hh) = HedgeLayer::new().with_min_samples(3).pair();
    let svc = tower::ServiceBuilder::new()
        .layer(hl)
        .layer(cl)
        .service(api.clone());
    for _ in 0..5 {
        svc.clone().oneshot(req("/status/200")).await.unwrap();
    }
    assert!(hh.stats("api.test").and_then(|s| s.delay()).is_some());
    assert!(panics(svc.clone(), req("/panic")).await);
    assert_eq!(ch.state("api.test").map(|s| s.in_flight()), Some(0));
    // Two slow calls at once still fit the limit of 2.
    let a = svc.clone().oneshot(req("/status/200"));
    let b = svc.clone().oneshot(req("/status/200"));
    let (a, b) = tokio::join!(a, b);
    assert!(a.is_ok() && b.is_ok());
}
