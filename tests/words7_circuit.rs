//! docs/guides/circuit.md and sturdy-circuit's crate docs, read literally: the failure-rate
//! default (50 % of at least 100 calls in 30 s, no streak trigger), what counts as a failure and
//! what is not counted at all, the open period (30 s doubling to 5 min, back to 30 s after a
//! close), the words of each refusal, half-open probes, the overflow breaker, setters after a
//! clone, the retry layer waiting out an open breaker within a deadline, and a kept service under
//! `Buffer` over `ConcurrencyLimit(1)`. Paused time, in process.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::{find, BoxError, CircuitOpen, OpenReason, RateLimited};
use sturdy::retry::{AttemptTimeoutLayer, RetryLayer};
use tower::{Layer, Service, ServiceExt};

#[derive(Clone, Copy, Debug)]
enum Act {
    Status(u16),
    Pending,
    LocalRefusal,
}

/// An API whose answer to each call is `script(call number from 0, host)`.
#[derive(Clone)]
struct Api {
    calls: Arc<AtomicUsize>,
    script: Arc<dyn Fn(usize, &str) -> Act + Send + Sync>,
}

impl Api {
    fn new(script: impl Fn(usize, &str) -> Act + Send + Sync + 'static) -> Self {
        Self {
            calls: Arc::default(),
            script: Arc::new(script),
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<Full<Bytes>>> for Api {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>,
    >;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let act = (self.script)(n, req.uri().host().unwrap_or(""));
        Box::pin(async move {
            match act {
                Act::Status(s) => Ok(Response::builder().status(s).body(Full::default()).unwrap()),
                Act::Pending => std::future::pending().await,
                Act::LocalRefusal => {
                    Err(Box::new(RateLimited::new(Duration::from_secs(1))) as BoxError)
                }
            }
        })
    }
}

fn get(host: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{host}/x"))
        .body(Full::default())
        .unwrap()
}

async fn call<S>(svc: &S, host: &str) -> Result<Response<Full<Bytes>>, BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError> + Clone,
{
    svc.clone().oneshot(get(host)).await
}

fn is_open(s: Option<CircuitState>) -> bool {
    matches!(s, Some(CircuitState::Open { .. }))
}

/// circuit.md:5-9: "Opens when at least 50 % of the calls of the last 30 s failed, once there
/// were at least 100 ... There is no streak trigger by default".
#[tokio::test(start_paused = true)]
async fn by_default_it_opens_at_half_of_100_calls_and_not_on_a_streak() {
    // 99 failures in a row: under the volume, still closed.
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let api = Api::new(|_, _| Act::Status(503));
    let svc = layer.layer(api.clone());
    for _ in 0..99 {
        assert_eq!(call(&svc, "a.example").await.unwrap().status(), 503);
    }
    assert_eq!(handle.state("a.example"), Some(CircuitState::Closed));
    // The 100th: opens.
    call(&svc, "a.example").await.unwrap();
    assert!(
        is_open(handle.state("a.example")),
        "{:?}",
        handle.state("a.example")
    );

    // 50 of 100 failed, the 100th a failure: "at least 50 %" opens.
    let api = Api::new(|n, _| Act::Status(if n % 2 == 1 { 503 } else { 200 }));
    let svc = layer.layer(api);
    for _ in 0..100 {
        call(&svc, "b.example").await.unwrap();
    }
    assert!(
        is_open(handle.state("b.example")),
        "{:?}",
        handle.state("b.example")
    );

    // 49 of 100: stays closed.
    let api = Api::new(|n, _| Act::Status(if n < 49 { 503 } else { 200 }));
    let svc = layer.layer(api);
    for _ in 0..100 {
        call(&svc, "c.example").await.unwrap();
    }
    assert_eq!(handle.state("c.example"), Some(CircuitState::Closed));

    // Failures older than the 30 s window no longer count.
    let api = Api::new(|_, _| Act::Status(503));
    let svc = layer.layer(api);
    for _ in 0..99 {
        call(&svc, "d.example").await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(31)).await;
    call(&svc, "d.example").await.unwrap();
    assert_eq!(handle.state("d.example"), Some(CircuitState::Closed));
}

/// circuit.md:5-6: "Opens when at least 50 % of the calls of the last 30 s failed, once there
/// were at least 100". Here 51 of the 100 calls failed (the failures first, the 100th call a
/// success): the rule holds, yet the breaker stays closed and admits the 101st call.
#[tokio::test(start_paused = true)]
async fn it_opens_once_the_volume_is_reached_whatever_the_last_outcome() {
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let api = Api::new(|n, _| Act::Status(if n < 51 { 503 } else { 200 }));
    let svc = layer.layer(api.clone());
    for _ in 0..100 {
        call(&svc, "api.example.com").await.unwrap();
    }
    assert!(
        is_open(handle.state("api.example.com")),
        "{:?}",
        handle.state("api.example.com")
    );
    let err = call(&svc, "api.example.com").await.unwrap_err();
    assert!(err.is::<CircuitOpen>());
    assert_eq!(api.calls(), 100);
}

/// circuit.md:14-15: "4xx, 429 and 401 are not failures"; :16-19: an error for a call that never
/// reached the dependency (a local rate-limit refusal) is not counted at all.
#[tokio::test(start_paused = true)]
async fn client_errors_and_local_refusals_never_open_it() {
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    for (host, act) in [
        ("h404.example", Act::Status(404)),
        ("h429.example", Act::Status(429)),
        ("h401.example", Act::Status(401)),
        ("local.example", Act::LocalRefusal),
    ] {
        let svc = layer.layer(Api::new(move |_, _| act));
        for _ in 0..200 {
            let _ = call(&svc, host).await;
        }
        assert_eq!(handle.state(host), Some(CircuitState::Closed), "{host}");
    }
}

/// circuit.md:20-26: "Open 30 s, doubling on each re-opening up to 5 min ..., back to 30 s after
/// a close"; the words of `Failing` ("it has been failing ... try again in 12s") and `Probing`
/// (half-open, "try again once they have answered", `retry_in` zero).
#[tokio::test(start_paused = true)]
async fn the_open_period_doubles_to_5_minutes_and_resets_after_a_close() {
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let healthy = Arc::new(Mutex::new(false));
    let h = healthy.clone();
    let api = Api::new(move |_, _| {
        if *h.lock().unwrap() {
            Act::Status(200)
        } else {
            Act::Status(503)
        }
    });
    let svc = layer.layer(api.clone());
    call(&svc, "api.example.com").await.unwrap();
    let mut periods = Vec::new();
    for _ in 0..6 {
        let err = call(&svc, "api.example.com").await.unwrap_err();
        let open = err.downcast_ref::<CircuitOpen>().expect("CircuitOpen");
        assert_eq!(open.reason(), OpenReason::Failing);
        let msg = err.to_string();
        assert!(msg.contains("it has been failing"), "{msg}");
        assert!(
            msg.contains(&format!(
                "try again in {}",
                sturdy::core::human_duration(open.retry_in())
            )),
            "{msg}"
        );
        periods.push(open.retry_in());
        // Wait it out; the probe fails and reopens.
        tokio::time::sleep(open.retry_in()).await;
        call(&svc, "api.example.com").await.unwrap();
    }
    let secs: Vec<u64> = periods.iter().map(Duration::as_secs).collect();
    assert_eq!(secs, [30, 60, 120, 240, 300, 300]);

    // A good probe closes it; the next opening is 30 s again.
    *healthy.lock().unwrap() = true;
    let wait = match handle.state("api.example.com") {
        Some(CircuitState::Open { retry_in }) => retry_in,
        s => panic!("{s:?}"),
    };
    tokio::time::sleep(wait).await;
    call(&svc, "api.example.com").await.unwrap();
    assert_eq!(handle.state("api.example.com"), Some(CircuitState::Closed));
    *healthy.lock().unwrap() = false;
    call(&svc, "api.example.com").await.unwrap();
    let err = call(&svc, "api.example.com").await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<CircuitOpen>().unwrap().retry_in(),
        Duration::from_secs(30)
    );
}

/// circuit.md:27-29: "Half-open: 1 probe at a time; everyone else fails fast ... A probe whose
/// future is dropped gives its slot back"; :22-24: `Probing` says "try again once they have
/// answered" with `retry_in` zero; :33: "0 probes is 1".
#[tokio::test(start_paused = true)]
async fn half_open_admits_one_probe_and_a_dropped_probe_gives_its_slot_back() {
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_probes(0)
        .pair();
    let api = Api::new(|n, _| {
        if n == 0 {
            Act::Status(503)
        } else {
            Act::Pending
        }
    });
    let svc = layer.layer(api.clone());
    call(&svc, "api.example.com").await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    // The probe hangs.
    let probe = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, "api.example.com").await }
    });
    tokio::task::yield_now().await;
    assert_eq!(api.calls(), 2);
    let err = call(&svc, "api.example.com").await.unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().unwrap();
    assert_eq!(open.reason(), OpenReason::Probing);
    assert_eq!(open.retry_in(), Duration::ZERO);
    assert!(
        err.to_string()
            .contains("try again once they have answered"),
        "{err}"
    );
    assert_eq!(api.calls(), 2, "a refused call reached the API");
    // Drop the probe: the next call is admitted as a probe.
    probe.abort();
    let _ = probe.await;
    let next = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, "api.example.com").await }
    });
    tokio::task::yield_now().await;
    assert_eq!(api.calls(), 3, "{:?}", handle.state("api.example.com"));
    next.abort();
}

/// circuit.md:10-14: a timeout from a timer under the breaker (`AttemptTimeoutLayer`) is a
/// failure; an attempt cut by the retry layer's own `with_attempt_timeout` above it is dropped,
/// not counted.
#[tokio::test(start_paused = true)]
async fn a_timeout_under_the_breaker_counts_and_one_above_it_does_not() {
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let under = layer.layer(
        AttemptTimeoutLayer::new(Some(Duration::from_millis(10)))
            .layer(Api::new(|_, _| Act::Pending)),
    );
    for _ in 0..2 {
        let _ = under.clone().oneshot(get("under.example")).await;
    }
    assert!(
        is_open(handle.state("under.example")),
        "{:?}",
        handle.state("under.example")
    );

    let above = RetryLayer::new()
        .with_max_attempts(1)
        .with_attempt_timeout(Duration::from_millis(10))
        .layer(layer.layer(Api::new(|_, _| Act::Pending)));
    for _ in 0..5 {
        assert!(above.clone().oneshot(get("above.example")).await.is_err());
    }
    assert_eq!(handle.state("above.example"), Some(CircuitState::Closed));
}

/// circuit.md:25-26: `Overflow`: "the call's host shares the overflow breaker of the hosts past
/// `with_max_breakers`, which has been failing; the message names the call's own host".
#[tokio::test(start_paused = true)]
async fn past_the_most_breakers_hosts_share_an_overflow_breaker_named_by_the_calls_host() {
    let layer = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_max_breakers(1);
    let svc = layer.layer(Api::new(|_, _| Act::Status(503)));
    // The one breaker kept: failing, so it is not forgotten.
    for _ in 0..2 {
        let _ = call(&svc, "a.example").await;
    }
    // b.example is past the bound: its failures open the overflow breaker.
    for _ in 0..2 {
        let _ = call(&svc, "b.example").await;
    }
    let err = call(&svc, "c.example").await.unwrap_err();
    let open = err
        .downcast_ref::<CircuitOpen>()
        .expect("refused by the overflow breaker");
    assert_eq!(open.reason(), OpenReason::Overflow);
    assert_eq!(open.key(), "c.example");
    assert!(err.to_string().contains("c.example"), "{err}");
}

/// circuit.md:34-36: "a setter called after a clone or a `pair()` applies to all of them";
/// :31-32: `on_state_change(|key, from, to| ..)` on every change.
#[tokio::test(start_paused = true)]
async fn a_setter_after_a_clone_applies_to_the_clone_and_changes_are_reported() {
    let changes = Arc::new(Mutex::new(Vec::new()));
    let c = changes.clone();
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let early_clone = layer.clone();
    let _layer = layer
        .with_consecutive_failures(2)
        .on_state_change(move |key, from, to| c.lock().unwrap().push((key.to_owned(), from, to)));
    let svc = early_clone.layer(Api::new(|_, _| Act::Status(500)));
    for _ in 0..2 {
        call(&svc, "api.example.com").await.unwrap();
    }
    assert!(
        is_open(handle.state("api.example.com")),
        "{:?}",
        handle.state("api.example.com")
    );
    let seen = changes.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0, "api.example.com");
    assert_eq!(seen[0].1, CircuitState::Closed);
    assert!(matches!(seen[0].2, CircuitState::Open { .. }));
}

/// circuit.md:38-40: with the retry layer above, "a call that meets an open breaker fails at once
/// unless it has a deadline that the breaker's `retry_in` fits: then the retry layer waits for the
/// probe and tries again".
#[tokio::test(start_paused = true)]
async fn the_retry_layer_waits_out_an_open_breaker_only_within_a_deadline() {
    let api = Api::new(|n, _| Act::Status(if n == 0 { 503 } else { 200 }));
    let breaker = CircuitBreakerLayer::new().with_consecutive_failures(1);
    let inner = breaker.layer(api.clone());
    // Opens the breaker (the 503 is retried into the open breaker: no deadline, so it fails).
    let no_deadline = RetryLayer::new().layer(inner.clone());
    let start = tokio::time::Instant::now();
    let err = no_deadline
        .clone()
        .oneshot(get("api.example.com"))
        .await
        .unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let err = no_deadline
        .oneshot(get("api.example.com"))
        .await
        .unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(api.calls(), 1);

    let with_deadline = RetryLayer::new()
        .with_deadline(Duration::from_secs(60))
        .layer(inner);
    let res = with_deadline.oneshot(get("api.example.com")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 2);
}

/// circuit.md:42-44: "a refused call does not touch it. It works over `ConcurrencyLimit` and
/// `Buffer`, with `oneshot` or a kept service."
#[tokio::test(start_paused = true)]
async fn a_kept_breaker_under_buffer_over_concurrency_limit_one_does_not_deadlock() {
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let api = Api::new(|n, _| Act::Status(if n == 0 { 503 } else { 200 }));
    let svc = layer.layer(tower::limit::ConcurrencyLimit::new(api.clone(), 1));
    let buffered = tower::buffer::Buffer::new(svc, 1);
    let run = async {
        let mut kept = buffered.clone();
        let res = kept.ready().await?.call(get("api.example.com")).await?;
        assert_eq!(res.status(), 503);
        for _ in 0..20 {
            let err = kept
                .ready()
                .await?
                .call(get("api.example.com"))
                .await
                .unwrap_err();
            assert!(find::<CircuitOpen>(&*err).is_some(), "{err}");
        }
        handle.force_close("api.example.com");
        let res = kept.ready().await?.call(get("api.example.com")).await?;
        assert_eq!(res.status(), 200);
        Ok::<_, BoxError>(())
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("no deadlock")
        .unwrap();
    assert_eq!(api.calls(), 2);
}

/// docs/RELIABILITY.md: "past it, idle limiters and healthy breakers (closed, with no failure
/// streak, even with calls in flight) are forgotten, then new keys share one"; the rustdoc of
/// `with_max_breakers` says "healthy breakers are forgotten".
#[tokio::test(start_paused = true)]
async fn past_the_bound_a_healthy_breaker_is_forgotten_even_with_a_call_in_flight() {
    let (layer, handle) = CircuitBreakerLayer::new().with_max_breakers(1).pair();
    let svc = layer.layer(Api::new(|_, host| {
        if host == "kept.example" {
            Act::Pending
        } else {
            Act::Status(503)
        }
    }));
    let busy = tokio::spawn({
        let svc = svc.clone();
        async move { call(&svc, "kept.example").await }
    });
    tokio::task::yield_now().await;
    assert_eq!(handle.state("kept.example"), Some(CircuitState::Closed));
    let _ = call(&svc, "b.example").await;
    assert_eq!(handle.state("kept.example"), None, "{:?}", handle.states());
    assert_eq!(handle.state("b.example"), Some(CircuitState::Closed));
    // The call in flight on the forgotten breaker ends without harm.
    busy.abort();
    assert!(busy.await.unwrap_err().is_cancelled());
}
