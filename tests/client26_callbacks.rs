//! Event callbacks that use the layer's own handle (or `Debug`) while they run: metrics.md says
//! "The callback runs inline, on the task where the event happened, with no lock of the layer
//! held", and the circuit crate says `on_state_change` runs "after the breaker's lock is
//! released". Each scenario runs on a thread of its own, so a deadlock fails the test instead
//! of hanging the suite.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::core::events::Event;
use sturdy::core::BoxError;
use tower::{Layer, Service, ServiceExt};

/// Runs `f` on a paused current-thread runtime of its own thread; fails if it does not finish
/// within 20 s of real time (a deadlock in a callback blocks the thread for good).
fn bounded<F, Fut>(what: &str, f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(f())));
        let _ = tx.send(r.map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        }));
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(())) => {}
        Ok(Err(p)) => panic!("{what}: panicked: {p}"),
        Err(_) => panic!("{what}: did not finish within 20 s (a callback deadlocked?)"),
    }
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

fn status(code: u16) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .body(Full::default())
        .unwrap()
}

#[test]
fn client26_circuit_callbacks_may_use_the_handle() {
    bounded("circuit", || async {
        use sturdy::circuit::CircuitBreakerLayer;
        let slot: Arc<OnceLock<sturdy::circuit::CircuitHandle>> = Arc::default();
        let seen = Arc::new(AtomicUsize::new(0));
        let (s1, n1) = (slot.clone(), seen.clone());
        let (s2, n2) = (slot.clone(), seen.clone());
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
            .on_event(move |e: &Event<'_>| {
                if let Some(h) = s1.get() {
                    let _ = h.states();
                    if let Event::CircuitChanged { key, .. } | Event::CircuitRejected { key, .. } =
                        e
                    {
                        let _ = h.state(key);
                        n1.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
            .on_state_change(move |key: &str, _from, _to| {
                if let Some(h) = s2.get() {
                    let _ = h.state(key);
                    let _ = h.states();
                    n2.fetch_add(1, Ordering::SeqCst);
                }
            })
            .pair();
        slot.set(handle.clone()).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let api = tower::service_fn(move |_r: Request<Full<Bytes>>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, BoxError>(status(if n == 0 { 503 } else { 200 })) }
        });
        let svc = layer.layer(api);
        // Closed -> open.
        let _ = svc.clone().oneshot(get("http://a.test/")).await;
        // Rejected.
        let err = svc
            .clone()
            .oneshot(get("http://a.test/"))
            .await
            .unwrap_err();
        assert!(err.is::<sturdy::core::CircuitOpen>(), "{err}");
        tokio::time::advance(Duration::from_millis(1100)).await;
        // Half-open probe succeeds: half-open, then closed.
        let res = svc.clone().oneshot(get("http://a.test/")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(seen.load(Ordering::SeqCst) >= 4);
    });
}

#[test]
fn client26_circuit_callback_may_force_another_breaker() {
    bounded("circuit force", || async {
        use sturdy::circuit::CircuitBreakerLayer;
        let slot: Arc<OnceLock<sturdy::circuit::CircuitHandle>> = Arc::default();
        let s1 = slot.clone();
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .on_state_change(move |key: &str, _from, _to| {
                if let Some(h) = s1.get() {
                    if key == "a.test" {
                        // Isolate the sibling host, and reset this one from inside the callback.
                        h.force_open("b.test");
                        h.force_close("a.test");
                    }
                }
            })
            .pair();
        slot.set(handle.clone()).unwrap();
        let api =
            tower::service_fn(|_r: Request<Full<Bytes>>| async { Ok::<_, BoxError>(status(503)) });
        let svc = layer.layer(api);
        let _ = svc.clone().oneshot(get("http://b.test/")).await;
        let _ = svc.clone().oneshot(get("http://a.test/")).await;
        let err = svc
            .clone()
            .oneshot(get("http://b.test/"))
            .await
            .unwrap_err();
        assert!(err.is::<sturdy::core::CircuitOpen>(), "{err}");
    });
}

#[test]
fn client26_ratelimit_callbacks_may_use_the_handle() {
    bounded("ratelimit", || async {
        use sturdy::ratelimit::{Quota, RateLimitLayer};
        let slot: Arc<OnceLock<sturdy::ratelimit::RateLimitHandle>> = Arc::default();
        let kinds = Arc::new(Mutex::new(Vec::new()));
        let (s1, k1) = (slot.clone(), kinds.clone());
        let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap())
            .with_max_wait(Duration::from_secs(2))
            .pair();
        let layer = layer.on_event(move |e: &Event<'_>| {
            if let Some(h) = s1.get() {
                let _ = h.paused();
                let _ = h.pause("a.test");
                let _ = h.waiting("a.test");
                let _ = h.learned_pace("a.test");
                let name = match e {
                    Event::RateLimitWaited { .. } => "waited",
                    Event::RateLimitRefused { .. } => "refused",
                    Event::RateLimitPaused { .. } => {
                        let _ = h.clear_pause("b.test");
                        "paused"
                    }
                    _ => "other",
                };
                k1.lock().unwrap().push(name);
            }
        });
        slot.set(handle.clone()).unwrap();
        let api = tower::service_fn(|r: Request<Full<Bytes>>| async move {
            if r.uri().path() == "/limited" {
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(429)
                        .header("retry-after", "1")
                        .body(Full::default())
                        .unwrap(),
                )
            } else {
                Ok(status(200))
            }
        });
        let svc = layer.layer(api);
        svc.clone().oneshot(get("http://a.test/")).await.unwrap();
        // Waits a second for its slot.
        svc.clone().oneshot(get("http://a.test/")).await.unwrap();
        // Refused: two seconds of wait needed for the third and fourth together.
        let a = svc.clone().oneshot(get("http://a.test/"));
        let b = svc.clone().oneshot(get("http://a.test/"));
        let c = svc.clone().oneshot(get("http://a.test/"));
        let (_, _, rc) = tokio::join!(a, b, c);
        assert!(rc.is_err());
        // A pause.
        let _ = svc.clone().oneshot(get("http://a.test/limited")).await;
        let k = kinds.lock().unwrap().clone();
        for want in ["waited", "refused", "paused"] {
            assert!(k.contains(&want), "{want} missing in {k:?}");
        }
    });
}

#[test]
fn client26_concurrency_callbacks_may_use_the_handle() {
    bounded("concurrency", || async {
        use sturdy::concurrency::AdaptiveConcurrencyLayer;
        let slot: Arc<OnceLock<sturdy::concurrency::ConcurrencyHandle>> = Arc::default();
        let seen = Arc::new(AtomicUsize::new(0));
        let (s1, n1) = (slot.clone(), seen.clone());
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_limits(1, 10)
            .with_initial_limit(1)
            .with_max_wait(Duration::ZERO)
            .pair();
        let layer = layer.on_event(move |e: &Event<'_>| {
            if let Some(h) = s1.get() {
                let _ = h.states();
                let _ = h.state("a.test");
                let _ = h.limit("a.test");
                if let Event::ConcurrencyRejected { .. } = e {
                    // Setting a limit from the refusal's callback (it reports a change itself).
                    h.set_limit("a.test", 3);
                }
                n1.fetch_add(1, Ordering::SeqCst);
            }
        });
        slot.set(handle.clone()).unwrap();
        let api = tower::service_fn(|_r: Request<Full<Bytes>>| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<_, BoxError>(status(200))
        });
        let svc = layer.layer(api);
        let a = svc.clone().oneshot(get("http://a.test/"));
        let b = svc.clone().oneshot(get("http://a.test/"));
        let (ra, rb) = tokio::join!(a, b);
        assert!(ra.is_ok());
        assert!(rb.is_err(), "the second call finds the limit of 1 full");
        assert!(
            seen.load(Ordering::SeqCst) >= 2,
            "refusal and the limit change"
        );
        assert_eq!(handle.limit("a.test"), Some(3));
        // Successes that raise the limit call back too.
        for _ in 0..20 {
            let calls: Vec<_> = (0..3)
                .map(|_| svc.clone().oneshot(get("http://a.test/")))
                .collect();
            futures_util::future::join_all(calls).await;
        }
    });
}

#[test]
fn client26_coalesce_callback_may_use_the_handle() {
    bounded("coalesce", || async {
        use sturdy::coalesce::CoalesceLayer;
        let slot: Arc<OnceLock<sturdy::coalesce::CoalesceHandle>> = Arc::default();
        let seen = Arc::new(AtomicUsize::new(0));
        let (s1, n1) = (slot.clone(), seen.clone());
        let (layer, handle) = CoalesceLayer::new().pair();
        let layer = layer.on_event(move |_e: &Event<'_>| {
            if let Some(h) = s1.get() {
                let _ = h.stats();
                let _ = h.in_flight("a.test");
                n1.fetch_add(1, Ordering::SeqCst);
            }
        });
        slot.set(handle.clone()).unwrap();
        let api = tower::service_fn(|_r: Request<Full<Bytes>>| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from("x")))
        });
        let svc = layer.layer(api);
        let calls: Vec<_> = (0..5)
            .map(|_| svc.clone().oneshot(get("http://a.test/")))
            .collect();
        for r in futures_util::future::join_all(calls).await {
            let body = r.unwrap().into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "x");
        }
        assert_eq!(seen.load(Ordering::SeqCst), 4);
    });
}

#[test]
fn client26_hedge_callbacks_may_use_the_handle() {
    bounded("hedge", || async {
        use sturdy::hedge::HedgeLayer;
        let slot: Arc<OnceLock<sturdy::hedge::HedgeHandle>> = Arc::default();
        let seen = Arc::new(AtomicUsize::new(0));
        let (s1, n1) = (slot.clone(), seen.clone());
        let (layer, handle) = HedgeLayer::new().with_min_samples(5).pair();
        let layer = layer.on_event(move |_e: &Event<'_>| {
            if let Some(h) = s1.get() {
                let _ = h.stats("a.test");
                let _ = h.all();
                let _ = h.latency_percentile("a.test", 0.5);
                n1.fetch_add(1, Ordering::SeqCst);
            }
        });
        slot.set(handle.clone()).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let api = tower::service_fn(move |_r: Request<Full<Bytes>>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                // Warm-up calls take 10 ms; call 40 hangs a second, its hedge answers fast.
                let d = if n == 40 { 1000 } else { 10 };
                tokio::time::sleep(Duration::from_millis(d)).await;
                Ok::<_, BoxError>(status(200))
            }
        });
        let mut svc = layer.layer(api);
        for _ in 0..41 {
            svc.ready()
                .await
                .unwrap()
                .call(get("http://a.test/"))
                .await
                .unwrap();
        }
        assert!(
            seen.load(Ordering::SeqCst) >= 2,
            "a hedge sent and won: {:?}",
            handle.stats("a.test")
        );
    });
}

#[test]
fn client26_token_callbacks_may_format_the_source_and_layer() {
    bounded("auth", || async {
        use sturdy::auth::{AuthLayer, ClientCredentials};
        let slot: Arc<OnceLock<ClientCredentials>> = Arc::default();
        let lslot: Arc<OnceLock<String>> = Arc::default();
        let seen = Arc::new(AtomicUsize::new(0));
        let (s1, n1) = (slot.clone(), seen.clone());
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let endpoint = tower::service_fn(move |_r: Request<Full<Bytes>>| {
            let i = n2.fetch_add(1, Ordering::SeqCst);
            async move {
                if i == 0 {
                    Ok::<_, BoxError>(
                        Response::builder()
                            .status(500)
                            .body(Full::<Bytes>::from("down"))
                            .unwrap(),
                    )
                } else {
                    Ok(Response::new(Full::<Bytes>::from(format!(
                        r#"{{"access_token":"tok-{i}","token_type":"Bearer","expires_in":3600}}"#
                    ))))
                }
            }
        });
        let tokens = ClientCredentials::new(endpoint, "https://auth.test/token", "id", "sec")
            .unwrap()
            .on_event(move |_e: &Event<'_>| {
                if let Some(c) = s1.get() {
                    let _ = format!("{c:?}");
                    n1.fetch_add(1, Ordering::SeqCst);
                }
            });
        slot.set(tokens.clone()).unwrap();
        let l2 = lslot.clone();
        let layer = AuthLayer::oauth2(tokens.clone()).on_event(move |_e: &Event<'_>| {
            let _ = l2.get();
        });
        let _ = lslot.set(format!("{layer:?}"));
        let api =
            tower::service_fn(|_r: Request<Full<Bytes>>| async { Ok::<_, BoxError>(status(200)) });
        let svc = layer.layer(api);
        assert!(svc.clone().oneshot(get("http://a.test/")).await.is_err());
        tokio::time::advance(Duration::from_secs(2)).await;
        svc.clone().oneshot(get("http://a.test/")).await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        let _ = StatusCode::OK;
    });
}
