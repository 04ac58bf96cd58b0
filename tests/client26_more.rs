//! More sentences read literally: a background token refresh lost with its runtime (auth.md: "if
//! that runtime shuts down mid-request, the next caller starts a new request"); the adaptive
//! limit's growth only while used and Vegas's first window at half the limit
//! (concurrency.md); the breaker's window of "the last 30 s" (circuit.md); coalesced callers
//! when the shared call's future panics (coalesce.md: "not a hang").
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::{ClientCredentials, ExposeSecret};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::concurrency::{AdaptiveConcurrencyLayer, Algorithm};
use sturdy::core::BoxError;
use tower::{Layer, ServiceExt};

type Req = Request<Full<Bytes>>;

fn req(path: &str) -> Req {
    Request::get(format!("http://api.test{path}"))
        .body(Full::default())
        .unwrap()
}

/// A background refresh (the token is still valid) whose runtime shuts down mid-request: the
/// next caller, on another runtime, starts a new one. Real time: a token of 2 s is due for
/// refresh after 1 s.
#[test]
fn client26_background_refresh_lost_with_its_runtime_is_started_again() {
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    let endpoint = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let n = h.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 1 {
                // The refresh started on the runtime that goes away: never answers.
                std::future::pending::<()>().await;
            }
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(format!(
                r#"{{"access_token":"t-{n}","token_type":"Bearer","expires_in":2}}"#
            ))))
        }
    });
    let src = ClientCredentials::new(endpoint, "https://auth.test/token", "id", "secret")
        .unwrap()
        .with_request_timeout(Duration::from_secs(30));
    let a = src.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let t = a.get().await.unwrap();
            assert_eq!(t.secret().expose_secret(), "t-0");
            tokio::time::sleep(Duration::from_millis(1150)).await;
            // Due for refresh: the valid token comes back, the refresh runs here.
            let t = a.get().await.unwrap();
            assert_eq!(t.secret().expose_secret(), "t-0");
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        drop(rt);
    })
    .join()
    .unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 2, "the refresh was sent");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Still valid (about 0.75 s left): returned at once, and a new refresh starts.
        let t = src.get().await.unwrap();
        assert_eq!(t.secret().expose_secret(), "t-0");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            hits.load(Ordering::SeqCst),
            3,
            "the next caller after the shutdown started a new request"
        );
        let t = src.get().await.unwrap();
        assert_eq!(t.secret().expose_secret(), "t-2");
    });
}

/// AIMD: "does not grow while unused": one call at a time never raises a limit of 20.
#[tokio::test(start_paused = true)]
async fn client26_aimd_does_not_grow_while_unused() {
    let (layer, h) = AdaptiveConcurrencyLayer::new().pair();
    let api = tower::service_fn(|_r: Req| async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    });
    let mut svc = layer.layer(api);
    for _ in 0..2000 {
        tower::Service::call(svc.ready().await.unwrap(), req("/"))
            .await
            .unwrap();
    }
    assert_eq!(h.limit("api.test"), Some(20));
}

/// Vegas: "its first window ... runs at half the limit": 20 calls at once against a limit of
/// 20 have at most 10 in flight at the server until the first window ends.
#[tokio::test(start_paused = true)]
async fn client26_vegas_first_window_runs_at_half_the_limit() {
    let (layer, h) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .pair();
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n2, p2) = (now.clone(), peak.clone());
    let api = tower::service_fn(move |_r: Req| {
        let (n, p) = (n2.clone(), p2.clone());
        async move {
            let c = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(c, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        }
    });
    let svc = layer.layer(api);
    let calls: Vec<_> = (0..20).map(|_| svc.clone().oneshot(req("/"))).collect();
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    assert!(
        peak.load(Ordering::SeqCst) <= 10,
        "peak in flight {} with a limit of {:?}",
        peak.load(Ordering::SeqCst),
        h.limit("api.test")
    );
}

/// The breaker counts "the calls of the last 30 s": 60 failures, then 40 successes 35 s later,
/// do not open it; the same 100 calls within 29 s do.
#[tokio::test(start_paused = true)]
async fn client26_breaker_window_is_the_last_30s() {
    for (gap, opens) in [(35u64, false), (29, true)] {
        let fail = Arc::new(AtomicU32::new(1));
        let f = fail.clone();
        let api = tower::service_fn(move |_r: Req| {
            let s = if f.load(Ordering::SeqCst) == 1 {
                503
            } else {
                200
            };
            async move {
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(s)
                        .body(Full::<Bytes>::default())
                        .unwrap(),
                )
            }
        });
        let (layer, h) = CircuitBreakerLayer::new().pair();
        let svc = layer.layer(api);
        for _ in 0..60 {
            svc.clone().oneshot(req("/")).await.unwrap();
        }
        tokio::time::advance(Duration::from_secs(gap)).await;
        fail.store(0, Ordering::SeqCst);
        for _ in 0..40 {
            let _ = svc.clone().oneshot(req("/")).await;
        }
        assert_eq!(
            matches!(h.state("api.test"), Some(CircuitState::Open { .. })),
            opens,
            "gap {gap}s: {:?}",
            h.state("api.test")
        );
    }
}

/// The shared call's future panics while two other callers wait for it. coalesce.md: a panic
/// while the shared call's future is polled "is caught: every caller of that call, the one whose
/// task polled it included, gets an error". So no caller hangs or panics, and the table is left
/// clean for the next identical call.
#[tokio::test(start_paused = true)]
async fn client26_coalesced_callers_of_a_panicking_shared_future_get_errors_and_none_hangs() {
    use sturdy::coalesce::CoalesceLayer;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let api = tower::service_fn(move |_r: Req| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if n == 0 {
                panic!("scripted panic in the shared call");
            }
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from("ok")))
        }
    });
    let (layer, h) = CoalesceLayer::new().pair();
    let svc = layer.layer(api);
    let a = tokio::spawn(svc.clone().oneshot(req("/x")));
    tokio::task::yield_now().await;
    let b = tokio::spawn(svc.clone().oneshot(req("/x")));
    let c2 = tokio::spawn(svc.clone().oneshot(req("/x")));
    let outcome = tokio::time::timeout(Duration::from_secs(60), async {
        (a.await, b.await, c2.await)
    })
    .await;
    let (ra, rb, rc) = outcome.expect("callers of a call whose future panicked hung");
    let show = |r: &Result<Result<Response<_>, BoxError>, tokio::task::JoinError>| match r {
        Ok(Ok(res)) => format!("ok {}", res.status()),
        Ok(Err(e)) => format!("error: {e}"),
        Err(e) => format!("task: {e}"),
    };
    eprintln!("{} | {} | {}", show(&ra), show(&rb), show(&rc));
    // Nothing is left in the table: the next identical call goes upstream.
    assert_eq!(h.in_flight("api.test"), 0);
    let res = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(req("/x")))
        .await
        .expect("the next identical call hung")
        .unwrap();
    assert_eq!(res.status(), 200);
    // As documented: every caller of that call got an error naming the panic (none got a
    // response, none waits, none panics).
    for r in [&ra, &rb, &rc] {
        assert!(
            matches!(r, Ok(Err(e)) if e.to_string().contains("scripted panic in the shared call")),
            "a caller of the panicking shared call did not get its error: {}",
            show(r)
        );
    }
}

/// A token client whose future panics (or whose `call` does): callers of `get` are told with an
/// error, without a hang, and the next request (answered) gives a token.
#[tokio::test(start_paused = true)]
async fn client26_a_panicking_token_client_does_not_strand_callers() {
    for in_call in [false, true] {
        let hits = Arc::new(AtomicU32::new(0));
        let h = hits.clone();
        #[derive(Clone)]
        struct Panicky {
            hits: Arc<AtomicU32>,
            in_call: bool,
        }
        impl tower::Service<Request<Full<Bytes>>> for Panicky {
            type Response = Response<Full<Bytes>>;
            type Error = BoxError;
            type Future = std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
            >;
            fn poll_ready(
                &mut self,
                _cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), BoxError>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn call(&mut self, _r: Request<Full<Bytes>>) -> Self::Future {
                let n = self.hits.fetch_add(1, Ordering::SeqCst);
                if n == 0 && self.in_call {
                    panic!("scripted panic in the token client's call");
                }
                Box::pin(async move {
                    if n == 0 {
                        panic!("scripted panic in the token client's future");
                    }
                    Ok(Response::new(Full::<Bytes>::from(
                        r#"{"access_token":"t-ok","token_type":"Bearer","expires_in":3600}"#,
                    )))
                })
            }
        }
        let src = ClientCredentials::new(
            Panicky { hits: h, in_call },
            "https://auth.test/token",
            "id",
            "secret",
        )
        .unwrap();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let s = src.clone();
                tokio::spawn(async move { s.get().await })
            })
            .collect();
        let done = tokio::time::timeout(
            Duration::from_secs(120),
            futures_util::future::join_all(waiters),
        )
        .await
        .unwrap_or_else(|_| panic!("in_call {in_call}: callers hung"));
        for r in &done {
            if let Err(e) = r {
                panic!("in_call {in_call}: a caller's task panicked: {e}");
            }
        }
        tokio::time::advance(Duration::from_secs(120)).await;
        let t = tokio::time::timeout(Duration::from_secs(120), src.get())
            .await
            .expect("the next caller hung")
            .expect("an answered request gives a token");
        assert_eq!(t.secret().expose_secret(), "t-ok");
        assert!(hits.load(Ordering::SeqCst) >= 2);
    }
}
