//! The auth layer composed with tower's `Buffer`, `ConcurrencyLimit` and `Timeout`, driven by a
//! kept service and by many tasks, inside `ClientBuilder`, and cancelled at each await point.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ExposeSecret};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::classify::delivery;
use sturdy::core::{CallOptions, Delivery, ErrorKind};
use sturdy::version::VersionLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::auth29_util::{
    api, creds, endpoint, get, poll_once, spawn_call, sturdy_err, tok, Reply, Seen, TOKEN_URL,
};

fn oauth(ts: &Seen, f: impl Fn(usize) -> Reply + Send + Sync + 'static) -> AuthLayer {
    AuthLayer::oauth2(creds(endpoint(ts, f)))
}

#[tokio::test(start_paused = true)]
async fn over_concurrency_limit_one_with_a_kept_service_and_a_401() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let mut svc = ServiceBuilder::new()
        .layer(oauth(&ts, |n| {
            tok(n, 3600).after(Duration::from_millis(100))
        }))
        .concurrency_limit(1)
        .service(api(&aps, |n, _| if n == 3 { 401 } else { 200 }));
    for _ in 0..10 {
        let res = tokio::time::timeout(Duration::from_secs(5), async {
            svc.ready().await.unwrap().call(get("/k")).await.unwrap()
        })
        .await
        .expect("stuck");
        assert_eq!(res.status(), 200);
    }
    assert_eq!(ts.calls(), 2);
    assert_eq!(aps.calls(), 11);
}

#[tokio::test(start_paused = true)]
async fn a_401_replay_under_buffer_of_one_does_not_deadlock() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let inner = tower::buffer::Buffer::new(
        api(&aps, |_, a| if a == "Bearer t-2" { 200 } else { 401 }),
        1,
    );
    let mut svc = oauth(&ts, |n| tok(n, 3600)).layer(inner);
    let res = tokio::time::timeout(Duration::from_secs(5), async {
        svc.ready().await.unwrap().call(get("/b")).await
    })
    .await
    .expect("the replay deadlocked on the buffer slot");
    assert_eq!(res.unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn under_a_buffer_from_many_tasks_one_token_request() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let auth =
        oauth(&ts, |n| tok(n, 3600).after(Duration::from_millis(200))).layer(api(&aps, |_, _| 200));
    let svc = tower::buffer::Buffer::new(auth, 4);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let svc = svc.clone();
        tasks.push(spawn_call(svc, get("/m")));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    assert_eq!(ts.calls(), 1);
    assert_eq!(aps.calls(), 40);
}

#[tokio::test(start_paused = true)]
async fn over_buffer_and_limit_from_many_tasks() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let svc = ServiceBuilder::new()
        .layer(oauth(&ts, |n| {
            tok(n, 3600).after(Duration::from_millis(200))
        }))
        .buffer(8)
        .concurrency_limit(1)
        .service(api(&aps, |_, _| 200));
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let svc = svc.clone();
        tasks.push(spawn_call(svc, get("/m")));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    assert_eq!(ts.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_around_a_slow_token_cuts_the_call_and_the_request_goes_on() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .layer(oauth(&ts, |n| tok(n, 3600).after(Duration::from_secs(5))))
        .service(api(&aps, |_, _| 200));
    assert!(svc.clone().oneshot(get("/t")).await.is_err());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(svc.oneshot(get("/t")).await.unwrap().status(), 200);
    assert_eq!(ts.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_token_wait_releases_its_concurrency_permit() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let mut svc = ServiceBuilder::new()
        .layer(oauth(&ts, |n| tok(n, 3600).after(Duration::from_secs(2))))
        .concurrency_limit(1)
        .service(api(&aps, |_, _| 200));
    svc.ready().await.unwrap();
    let fut = svc.call(get("/d"));
    // Poll it once so it is waiting for the token, then drop it.
    let mut fut = Box::pin(fut);
    assert!(poll_once(&mut fut).await.is_pending());
    drop(fut);
    tokio::time::timeout(Duration::from_millis(10), svc.ready())
        .await
        .expect("the permit was not released by the dropped call")
        .unwrap();
    let res = svc.call(get("/d")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(ts.calls(), 1, "the token request was started again");
}

#[tokio::test(start_paused = true)]
async fn a_call_made_but_never_polled_then_dropped_leaves_nothing_held() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let mut svc = ServiceBuilder::new()
        .layer(oauth(&ts, |n| tok(n, 3600)))
        .concurrency_limit(1)
        .service(api(&aps, |_, _| 200));
    for _ in 0..5 {
        svc.ready().await.unwrap();
        drop(svc.call(get("/n")));
    }
    let res = tokio::time::timeout(Duration::from_secs(1), async {
        svc.ready().await.unwrap().call(get("/n")).await
    })
    .await
    .expect("stuck");
    assert_eq!(res.unwrap().status(), 200);
    assert_eq!(aps.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn callers_dropped_at_every_point_of_a_token_request_leave_no_stuck_state() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let svc =
        oauth(&ts, |n| tok(n, 3600).after(Duration::from_millis(100))).layer(api(&aps, |_, _| 200));
    // Dropped at 0, 1, 50 and 99 ms into a 100 ms token request.
    for ms in [0u64, 1, 49, 49] {
        let r =
            tokio::time::timeout(Duration::from_millis(ms), svc.clone().oneshot(get("/c"))).await;
        assert!(r.is_err(), "{ms}");
    }
    assert_eq!(svc.clone().oneshot(get("/c")).await.unwrap().status(), 200);
    assert!(ts.calls() <= 2, "{} token requests", ts.calls());
}

#[tokio::test(start_paused = true)]
async fn a_background_refresh_whose_callers_all_left_still_lands() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let svc = oauth(&ts, |n| {
        if n == 1 {
            tok(n, 120)
        } else {
            tok(n, 3600).after(Duration::from_secs(3))
        }
    })
    .layer(api(&aps, |_, _| 200));
    svc.clone().oneshot(get("/r")).await.unwrap();
    tokio::time::advance(Duration::from_secs(61)).await;
    // Due: this call starts the refresh and is dropped at once.
    let _ = tokio::time::timeout(Duration::ZERO, svc.clone().oneshot(get("/r"))).await;
    svc.clone().oneshot(get("/r")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    svc.clone().oneshot(get("/r")).await.unwrap();
    assert_eq!(ts.calls(), 2);
    assert_eq!(aps.auths().last().unwrap(), "Bearer t-2");
}

#[test]
fn a_token_request_lost_with_its_runtime_is_started_again_by_the_next_caller() {
    let ts = Seen::default();
    let cc = creds(endpoint(&ts, |n| {
        if n == 1 {
            Reply::never()
        } else {
            tok(n, 3600)
        }
    }));
    let first = cc.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = tokio::time::timeout(Duration::from_millis(50), first.get()).await;
            assert!(r.is_err());
        });
        drop(rt);
    })
    .join()
    .unwrap();
    assert_eq!(ts.calls(), 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), cc.get()).await })
        .expect("still waiting for the request lost with its runtime")
        .unwrap();
    assert_eq!(t.secret().expose_secret(), "t-2");
}

#[test]
fn a_waiter_on_a_dropped_runtime_moves_to_a_new_request() {
    // A caller on runtime B waits for the request runtime A runs; A shuts down mid-request.
    let ts = Seen::default();
    let cc = creds(endpoint(&ts, |n| {
        if n == 1 {
            Reply::never()
        } else {
            tok(n, 3600)
        }
    }));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let a = cc.clone();
    let ta = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(30), a.get()).await;
        });
        started_tx.send(()).unwrap();
        stop_rx.recv().unwrap();
        drop(rt);
    });
    started_rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = rt.block_on(async {
        let waiter = tokio::spawn({
            let cc = cc.clone();
            async move { cc.get().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiter).await
    });
    ta.join().unwrap();
    let t = t
        .expect("the waiter stayed on the lost request")
        .unwrap()
        .unwrap();
    assert_eq!(t.secret().expose_secret(), "t-2");
}

#[test]
fn a_request_whose_runtime_is_not_driven_is_given_up_10s_after_its_timeout() {
    let ts = Seen::default();
    let cc = creds(endpoint(&ts, |n| {
        tok(n, 3600).after(Duration::from_millis(20))
    }))
    .with_request_timeout(Duration::from_millis(100));
    let (idle_tx, idle_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let a = cc.clone();
    // Runtime A starts the request, then is kept alive but never driven again.
    let ta = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut f = Box::pin(a.get());
            let _ = poll_once(&mut f).await;
            // Let the request's task reach the endpoint, then never drive this runtime again.
            for _ in 0..5 {
                tokio::task::yield_now().await;
            }
            std::mem::forget(f);
        });
        ready_tx.send(()).unwrap();
        idle_rx.recv().unwrap();
        drop(rt);
    });
    ready_rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let start = Instant::now();
    let r = rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), cc.get()).await });
    let took = start.elapsed();
    idle_tx.send(()).unwrap();
    ta.join().unwrap();
    let t = r.expect("never moved to a new request").unwrap();
    // Either the first poll had sent request 1 (then this is `t-2`), or it had only registered
    // it (then the new request is the first the endpoint sees): what matters is the wait.
    assert_eq!(
        t.secret().expose_secret(),
        format!("t-{}", ts.calls()),
        "{took:?}"
    );
    assert!(
        took >= Duration::from_secs(9) && took <= Duration::from_secs(12),
        "moved after {took:?}"
    );
    drop(rt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_across_short_lived_tokens_never_fail() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let svc = oauth(&ts, |n| tok(n, 1).after(Duration::from_millis(5))).layer(api(&aps, |_, a| {
        if a.starts_with("Bearer t-") {
            200
        } else {
            401
        }
    }));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(call_until(
            svc,
            start + Duration::from_millis(1600),
        )));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert!(total > 100, "{total}");
    assert!(
        ts.calls() <= 6,
        "{} token requests in 1.6 s of 1 s tokens",
        ts.calls()
    );
}

/// Calls `svc` until `end`, each call expected to succeed; returns how many were made.
fn call_until<S>(
    svc: S,
    end: Instant,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send>>
where
    S: Service<crate::auth29_util::Req, Response = crate::auth29_util::Res>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    Box::pin(async move {
        let mut n = 0;
        while Instant::now() < end {
            let res = svc.clone().oneshot(get("/s")).await.unwrap();
            assert_eq!(res.status(), 200);
            n += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        n
    })
}

fn assert_send_sync_clone<T: Send + Sync + Clone>(_: &T) {}

#[test]
fn layers_services_and_the_client_are_send_sync_clone() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let layer = oauth(&ts, |n| tok(n, 60));
    assert_send_sync_clone(&layer);
    let svc = layer.layer(api(&aps, |_, _| 200));
    assert_send_sync_clone(&svc);
    assert_send_sync_clone(&creds(endpoint(&ts, |n| tok(n, 60))));
    let client = ClientBuilder::new()
        .with_auth(layer)
        .with_version(VersionLayer::header("api-version", "1").unwrap())
        .build(api(&aps, |_, _| 200));
    assert_send_sync_clone(&client);
}

#[tokio::test(start_paused = true)]
async fn in_the_client_builder_stack_a_401_refreshes_and_the_version_is_pinned() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let client = ClientBuilder::new()
        .with_auth(oauth(&ts, |n| tok(n, 3600)))
        .with_version(VersionLayer::header("api-version", "2024-06-01").unwrap())
        .build(api(&aps, |_, a| if a == "Bearer t-2" { 200 } else { 401 }));
    let req = Request::post("http://api.example.com/orders")
        .body(Full::from("{}"))
        .unwrap();
    assert_eq!(client.clone().oneshot(req).await.unwrap().status(), 200);
    let h = aps.headers();
    assert_eq!(h.len(), 2);
    assert!(h.iter().all(|h| h["api-version"] == "2024-06-01"));
    assert_eq!(h[0]["idempotency-key"], h[1]["idempotency-key"]);
    assert_eq!(ts.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn in_the_stack_a_deadline_during_the_first_token_wait_says_so_and_not_sent() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let client = ClientBuilder::new()
        .with_auth(oauth(&ts, |_| Reply::never()))
        .build(api(&aps, |_, _| 200));
    let mut req = Request::post("http://api.example.com/pay")
        .body(Full::from("{}"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(200)));
    let start = Instant::now();
    let err = client.oneshot(req).await.unwrap_err();
    assert!(
        start.elapsed() <= Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
    let text = err.to_string();
    assert!(
        text.contains(
            "the overall deadline of 200ms passed while attempt 1 waited for an access token, before it was sent"
        ),
        "{text}"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(aps.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn in_the_stack_the_attempt_timeout_bounds_the_token_wait() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let client = ClientBuilder::new()
        .without_retry()
        .with_attempt_timeout(Duration::from_millis(300))
        .with_auth(oauth(&ts, |_| Reply::never()))
        .build(api(&aps, |_, _| 200));
    let start = Instant::now();
    let err = client.oneshot(get("/x")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert!(e.to_string().contains(TOKEN_URL), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_failing_token_endpoint_does_not_open_the_api_hosts_breaker() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let client = ClientBuilder::new()
        .without_retry()
        .with_circuit_breaker(breaker)
        .with_auth(oauth(&ts, |_| Reply::new(503, "")))
        .build(api(&aps, |_, _| 200));
    for _ in 0..20 {
        let err = client.clone().oneshot(get("/b")).await.unwrap_err();
        assert!(
            sturdy::core::find::<sturdy::core::CircuitOpen>(&*err).is_none(),
            "{err}"
        );
        tokio::time::advance(Duration::from_secs(61)).await;
    }
    assert!(matches!(
        handle.state("api.example.com"),
        None | Some(CircuitState::Closed)
    ));
    assert_eq!(aps.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_half_open_probe_refused_for_want_of_a_token_gives_its_slot_back() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = ServiceBuilder::new()
        .layer(breaker)
        .layer(oauth(&ts, |n| {
            if n == 1 {
                tok(n, 30)
            } else if n == 2 {
                Reply::new(503, "")
            } else {
                tok(n, 3600)
            }
        }))
        .service(api(&aps, |n, _| if n == 1 { 500 } else { 200 }));
    assert_eq!(svc.clone().oneshot(get("/p")).await.unwrap().status(), 500);
    tokio::time::advance(Duration::from_secs(31)).await;
    // The probe: the token expired, its refresh fails (503): not counted, slot back.
    let err = svc.clone().oneshot(get("/p")).await.unwrap_err();
    assert!(
        sturdy::core::find::<sturdy::core::CircuitOpen>(&*err).is_none(),
        "{err}"
    );
    assert_eq!(
        handle.state("api.example.com"),
        Some(CircuitState::HalfOpen)
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(svc.clone().oneshot(get("/p")).await.unwrap().status(), 200);
    assert_eq!(handle.state("api.example.com"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn the_client_under_a_buffer_with_a_kept_service() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let client = ClientBuilder::new()
        .with_auth(oauth(&ts, |n| {
            tok(n, 3600).after(Duration::from_millis(10))
        }))
        .build(api(&aps, |_, _| 200));
    let mut svc = tower::buffer::Buffer::new(client, 2);
    for _ in 0..10 {
        let res = svc.ready().await.unwrap().call(get("/k")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(ts.calls(), 1);
    let _ = Arc::new(());
}
