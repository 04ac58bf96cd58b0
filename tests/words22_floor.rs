//! The attempt timer and its per-thread floor timer: paused clocks (paused mid-test, resumed,
//! advanced), the bound of every attempt (short, long, per request, `Duration::MAX`, zero), many
//! runtimes on one thread and on many, runtime shutdown and thread exit, tower composition, and
//! real hyper servers on loopback.

// Real-time bounds are measured on the system clock, and waits that must involve no tokio timer
// are made by plain OS threads.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use axum::routing::get as get_route;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use sturdy::core::{find, BoxError, CallOptions, Error, ErrorKind};
use sturdy::retry::{AttemptTimeoutLayer, RetryLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;
type Svc = BoxCloneSyncService<Req, Res, BoxError>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn get() -> Req {
    Request::get("http://api.test/items")
        .body(Full::default())
        .unwrap()
}

fn get_with(opts: CallOptions) -> Req {
    let mut req = get();
    req.extensions_mut().insert(opts);
    req
}

/// Answers after a tokio sleep of `d` (real or paused, whichever clock runs).
fn sleepy(d: Duration) -> Svc {
    BoxCloneSyncService::new(service_fn(move |_r: Req| async move {
        tokio::time::sleep(d).await;
        Ok::<Res, BoxError>(Response::new(Full::default()))
    }))
}

/// Never answers; each call's future holds a clone of `held` while it lives.
fn stalled(held: Arc<()>) -> Svc {
    BoxCloneSyncService::new(service_fn(move |_r: Req| {
        let held = held.clone();
        async move {
            let _keep = held;
            std::future::pending::<()>().await;
            Ok::<Res, BoxError>(Response::new(Full::default()))
        }
    }))
}

/// Answers after a real-time wait done on another OS thread, so that no tokio timer is involved
/// in the wait (usable on a paused clock).
fn answered_from_thread(wait: Duration) -> Svc {
    BoxCloneSyncService::new(service_fn(move |_r: Req| async move {
        external_wait(wait).await;
        Ok::<Res, BoxError>(Response::new(Full::default()))
    }))
}

/// Waits `d` of real time without any tokio timer: another OS thread wakes us.
async fn external_wait(d: Duration) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        std::thread::sleep(d);
        let _ = tx.send(());
    });
    rx.await.unwrap();
}

/// How far tokio's (paused) clock moves while we wait 50 ms of real time on an external wake,
/// with no timer of our own pending: 0 unless some timer is registered on this runtime.
async fn paused_clock_jump() -> Duration {
    let t0 = Instant::now();
    external_wait(ms(50)).await;
    t0.elapsed()
}

/// The service behind a box whose future is `Send` (for `tokio::spawn`).
fn boxed<S>(svc: S) -> Svc
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(svc)
}

fn is_attempt_timeout(err: &BoxError) -> bool {
    find::<Error>(&**err).is_some_and(|e| e.kind() == &ErrorKind::Timeout)
}

/// Runs `f` on its own thread and fails if it does not end within `limit` (a hang).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            h.join().expect("the thread ended without a panic");
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("hung: not done within {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(()) => unreachable!(),
            Err(p) => std::panic::resume_unwind(p),
        },
    }
}

fn current_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn multi_rt(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Paused clocks
// ---------------------------------------------------------------------------------------------

/// Baseline: tower-free tokio code that waited on a timer in real time and then paused the
/// clock sees no jump; this is what the tests below compare with.
#[tokio::test(flavor = "current_thread")]
async fn words22_control_plain_timeout_then_pause_no_jump() {
    let r = tokio::time::timeout(Duration::from_secs(10), sleepy(ms(20)).oneshot(get())).await;
    assert!(r.is_ok());
    tokio::time::pause();
    assert_eq!(paused_clock_jump().await, Duration::ZERO);
}

/// CHANGELOG (sturdy-retry, Unreleased) and PERFORMANCE.md ("The attempt timeout's cost"): the
/// floor is armed only while tokio's clock is the real one, "so paused-time tests see no timer of
/// sturdy's after a call". A test that made a real-time call and then paused the clock must not
/// see the clock auto-advance to a timer it never made.
#[tokio::test(flavor = "current_thread")]
async fn words22_layer_call_then_pause_no_clock_jump() {
    let svc = AttemptTimeoutLayer::new(Some(Duration::from_secs(10))).layer(sleepy(ms(20)));
    svc.oneshot(get()).await.unwrap();
    tokio::time::pause();
    let jump = paused_clock_jump().await;
    assert_eq!(
        jump,
        Duration::ZERO,
        "the paused clock jumped {jump:?} to a timer the test did not make"
    );
}

/// The same through `sturdy::ClientBuilder` (its 30 s attempt timeout), in a test that started
/// paused, resumed the clock for a real call, then paused it again.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn words22_client_resume_call_pause_no_clock_jump() {
    let client = ClientBuilder::new().build(sleepy(ms(20)));
    // Paused: the call takes exactly the service's 20 ms and leaves nothing behind.
    let t0 = Instant::now();
    client.clone().oneshot(get()).await.unwrap();
    assert_eq!(t0.elapsed(), ms(20));
    assert_eq!(paused_clock_jump().await, Duration::ZERO);
    tokio::time::resume();
    client.clone().oneshot(get()).await.unwrap();
    tokio::time::pause();
    let jump = paused_clock_jump().await;
    assert_eq!(
        jump,
        Duration::ZERO,
        "the paused clock jumped {jump:?} to a timer the test did not make"
    );
}

/// The same through `sturdy::ClientBuilder` in a test that runs on the real clock, then pauses.
#[tokio::test(flavor = "current_thread")]
async fn words22_client_real_call_then_pause_no_clock_jump() {
    let client = ClientBuilder::new().build(sleepy(ms(20)));
    client.clone().oneshot(get()).await.unwrap();
    tokio::time::pause();
    let jump = paused_clock_jump().await;
    assert_eq!(
        jump,
        Duration::ZERO,
        "the paused clock jumped {jump:?} to a timer the test did not make"
    );
}

/// A test that starts paused and resumes the clock before its first call (say to talk to a real
/// server), then pauses again: no timer of sturdy's is left to auto-advance to.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn words22_layer_resume_first_call_then_pause_no_jump() {
    tokio::time::resume();
    AttemptTimeoutLayer::new(Some(Duration::from_secs(8)))
        .layer(sleepy(ms(20)))
        .oneshot(get())
        .await
        .unwrap();
    tokio::time::pause();
    let jump = paused_clock_jump().await;
    assert_eq!(
        jump,
        Duration::ZERO,
        "the paused clock jumped {jump:?} to a timer the test did not make"
    );
}

/// Through the retry layer's own `with_attempt_timeout`, paused after a real call, then driven by
/// `advance`: an explicit advance moves the clock by exactly what was asked.
#[tokio::test(flavor = "current_thread")]
async fn words22_retry_timeout_call_then_pause_advance_exact() {
    let svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_attempt_timeout(Duration::from_secs(5))
                .with_max_attempts(1),
        )
        .service(sleepy(ms(20)));
    svc.oneshot(get()).await.unwrap();
    tokio::time::pause();
    let t0 = Instant::now();
    tokio::time::advance(ms(300)).await;
    assert_eq!(t0.elapsed(), ms(300));
    let jump = paused_clock_jump().await;
    assert_eq!(jump, Duration::ZERO, "the paused clock jumped {jump:?}");
}

/// Started paused: every attempt's bound is exact, and after the calls no timer of sturdy's is
/// left (the clock does not move while the test waits for something outside tokio).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn words22_paused_bounds_exact_and_nothing_left() {
    let layer = AttemptTimeoutLayer::new(Some(Duration::from_secs(10)));
    // Answered in time: exactly the service's time.
    let t0 = Instant::now();
    layer.layer(sleepy(ms(1500))).oneshot(get()).await.unwrap();
    assert_eq!(t0.elapsed(), ms(1500));
    // Too slow: exactly the timeout.
    let t0 = Instant::now();
    let err = layer
        .layer(sleepy(Duration::from_secs(60)))
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(10));
    assert_eq!(err.to_string(), "the attempt timed out after 10s");
    // A per-request timeout shorter than the layer's.
    let t0 = Instant::now();
    let err = layer
        .layer(sleepy(Duration::from_secs(60)))
        .oneshot(get_with(CallOptions::new().with_attempt_timeout(ms(250))))
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), ms(250));
    assert!(is_attempt_timeout(&err), "{err}");
    // A per-request timeout longer than the layer's.
    let t0 = Instant::now();
    layer
        .layer(sleepy(Duration::from_secs(30)))
        .oneshot(get_with(
            CallOptions::new().with_attempt_timeout(Duration::from_secs(40)),
        ))
        .await
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(30));
    // None at all for this request.
    let t0 = Instant::now();
    layer
        .layer(sleepy(Duration::from_secs(3600)))
        .oneshot(get_with(CallOptions::new().without_attempt_timeout()))
        .await
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(3600));
    assert_eq!(paused_clock_jump().await, Duration::ZERO);
}

/// Paused: `Duration::MAX` as the layer's, the retry layer's and a request's timeout is
/// accepted; the attempt is bounded by its service only, and nothing is left pending.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn words22_paused_duration_max_everywhere() {
    let t0 = Instant::now();
    AttemptTimeoutLayer::new(Some(Duration::MAX))
        .layer(sleepy(Duration::from_secs(7)))
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(7));
    let t0 = Instant::now();
    ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_attempt_timeout(Duration::MAX)
                .with_max_attempts(1),
        )
        .service(sleepy(Duration::from_secs(7)))
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(7));
    let t0 = Instant::now();
    ClientBuilder::new()
        .with_attempt_timeout(ms(100))
        .build(sleepy(Duration::from_secs(7)))
        .oneshot(get_with(
            CallOptions::new().with_attempt_timeout(Duration::MAX),
        ))
        .await
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(7));
    assert_eq!(paused_clock_jump().await, Duration::ZERO);
}

/// Paused: a zero timeout cuts an attempt that waits at once, without moving the clock and
/// without a panic.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn words22_paused_zero_timeout_cuts_waiting_attempt_at_once() {
    let t0 = Instant::now();
    let err = AttemptTimeoutLayer::new(Some(Duration::ZERO))
        .layer(sleepy(Duration::from_secs(1)))
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert!(is_attempt_timeout(&err), "{err}");
    let err = AttemptTimeoutLayer::new(Some(Duration::from_secs(9)))
        .layer(sleepy(Duration::from_secs(1)))
        .oneshot(get_with(
            CallOptions::new().with_attempt_timeout(Duration::ZERO),
        ))
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert!(is_attempt_timeout(&err), "{err}");
    assert_eq!(paused_clock_jump().await, Duration::ZERO);
}

/// Paused, an attempt waiting on something outside tokio (no timer but the attempt's own): the
/// clock auto-advances straight to the attempt's deadline, not to any other timer first.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn words22_paused_external_wait_times_out_at_its_own_deadline() {
    let t0 = Instant::now();
    let err = AttemptTimeoutLayer::new(Some(Duration::from_secs(4)))
        .layer(answered_from_thread(ms(200)))
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(4));
    assert!(is_attempt_timeout(&err), "{err}");
}

/// Paused, composed: Buffer over ConcurrencyLimit(1) over tower's Timeout over the attempt
/// timeout, driven as a kept service; then the retry layer's own timer above the same. Bounds
/// are exact and the permit comes back for the next call.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn words22_paused_composed_kept_service_exact() {
    let mut svc = ServiceBuilder::new()
        .buffer(8)
        .concurrency_limit(1)
        .timeout(Duration::from_secs(60))
        .layer(AttemptTimeoutLayer::new(Some(Duration::from_secs(2))))
        .service(sleepy(Duration::from_secs(5)));
    for _ in 0..3 {
        let t0 = Instant::now();
        let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
        assert!(is_attempt_timeout(&err), "{err}");
    }
    let t0 = Instant::now();
    svc.ready()
        .await
        .unwrap()
        .call(get_with(
            CallOptions::new().with_attempt_timeout(Duration::from_secs(6)),
        ))
        .await
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(5));

    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let inner = BoxCloneSyncService::new(service_fn(move |_r: Req| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<Res, BoxError>(Response::new(Full::default()))
        }
    }));
    let mut svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_attempt_timeout(Duration::from_secs(1))
                .with_max_attempts(3)
                .with_seed(22),
        )
        .buffer(8)
        .concurrency_limit(1)
        .service(inner);
    let t0 = Instant::now();
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 3, "{err}");
    assert!(t0.elapsed() >= Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(is_attempt_timeout(&err), "{err}");
    assert_eq!(paused_clock_jump().await, Duration::ZERO);
}

// ---------------------------------------------------------------------------------------------
// Real clock: every attempt bounded
// ---------------------------------------------------------------------------------------------

/// Real time, one thread: after long timeouts armed the floor far ahead, a short timeout (the
/// layer's, and a request's shorter than the layer's) still cuts its attempt on time, and a
/// service slower than nothing but faster than the timeout is not cut early.
#[tokio::test(flavor = "current_thread")]
async fn words22_real_short_after_long_bounded() {
    for _ in 0..5 {
        AttemptTimeoutLayer::new(Some(Duration::from_secs(20)))
            .layer(sleepy(ms(5)))
            .oneshot(get())
            .await
            .unwrap();
    }
    let held = Arc::new(());
    let t0 = std::time::Instant::now();
    let err = AttemptTimeoutLayer::new(Some(ms(150)))
        .layer(stalled(held.clone()))
        .oneshot(get())
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert!(is_attempt_timeout(&err), "{err}");
    assert!(took >= ms(150) && took < ms(900), "{took:?}");
    assert_eq!(
        Arc::strong_count(&held),
        1,
        "the cut attempt's future is kept"
    );

    let t0 = std::time::Instant::now();
    let err = AttemptTimeoutLayer::new(Some(Duration::from_secs(20)))
        .layer(stalled(held.clone()))
        .oneshot(get_with(CallOptions::new().with_attempt_timeout(ms(120))))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert!(is_attempt_timeout(&err), "{err}");
    assert!(took >= ms(120) && took < ms(900), "{took:?}");
    assert_eq!(Arc::strong_count(&held), 1);

    // Not early: 200 ms of work under a 400 ms timeout, many times over.
    for _ in 0..5 {
        AttemptTimeoutLayer::new(Some(ms(400)))
            .layer(sleepy(ms(200)))
            .oneshot(get())
            .await
            .unwrap();
    }
}

/// Real time: `Duration::MAX` (and other huge timeouts) on a waiting attempt, through the layer,
/// the retry layer, a request's options and `ClientBuilder`: no overflow panic, the call answers.
#[tokio::test(flavor = "current_thread")]
async fn words22_real_huge_timeouts_no_panic() {
    for d in [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 2),
        Duration::from_secs(u64::MAX / 3),
        Duration::from_secs(400 * 365 * 24 * 3600),
    ] {
        AttemptTimeoutLayer::new(Some(d))
            .layer(sleepy(ms(10)))
            .oneshot(get())
            .await
            .unwrap();
        ServiceBuilder::new()
            .layer(RetryLayer::new().with_attempt_timeout(d))
            .service(sleepy(ms(10)))
            .oneshot(get())
            .await
            .unwrap();
        AttemptTimeoutLayer::new(Some(ms(100)))
            .layer(sleepy(ms(10)))
            .oneshot(get_with(CallOptions::new().with_attempt_timeout(d)))
            .await
            .unwrap();
        ClientBuilder::new()
            .with_attempt_timeout(d)
            .build(sleepy(ms(10)))
            .oneshot(get())
            .await
            .unwrap();
    }
    // And a short one afterwards is still a bound.
    let t0 = std::time::Instant::now();
    let err = AttemptTimeoutLayer::new(Some(ms(120)))
        .layer(stalled(Arc::new(())))
        .oneshot(get())
        .await
        .unwrap_err();
    assert!(is_attempt_timeout(&err), "{err}");
    assert!(t0.elapsed() < ms(900), "{:?}", t0.elapsed());
}

/// Real time, zero timeout: the waiting attempt fails at once, no panic.
#[tokio::test(flavor = "current_thread")]
async fn words22_real_zero_timeout() {
    let t0 = std::time::Instant::now();
    let err = AttemptTimeoutLayer::new(Some(Duration::ZERO))
        .layer(sleepy(ms(300)))
        .oneshot(get())
        .await
        .unwrap_err();
    assert!(is_attempt_timeout(&err), "{err}");
    assert!(t0.elapsed() < ms(250), "{:?}", t0.elapsed());
}

/// A task whose future holds an `Arc` and makes waiting calls is dropped as soon as it finishes:
/// neither the attempt timer nor the floor keeps the task (or its waker) alive.
#[tokio::test(flavor = "current_thread")]
async fn words22_finished_task_future_dropped_promptly() {
    let held = Arc::new(());
    let svc = boxed(AttemptTimeoutLayer::new(Some(Duration::from_secs(8))).layer(sleepy(ms(15))));
    let h = held.clone();
    let s = svc.clone();
    tokio::spawn(async move {
        let _keep = h;
        for _ in 0..3 {
            s.clone().oneshot(get()).await.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(Arc::strong_count(&held), 1);
    // A task whose attempt was cut by its timeout.
    let h = held.clone();
    let s = boxed(AttemptTimeoutLayer::new(Some(ms(100))).layer(stalled(held.clone())));
    tokio::spawn(async move {
        let _keep = h;
        assert!(s.oneshot(get()).await.is_err());
    })
    .await
    .unwrap();
    assert_eq!(Arc::strong_count(&held), 1);
}

// ---------------------------------------------------------------------------------------------
// Many runtimes, threads, shutdown
// ---------------------------------------------------------------------------------------------

/// One attempt that waits and one that is cut, on whatever runtime runs them.
async fn one_round(timeout: Duration) {
    AttemptTimeoutLayer::new(Some(timeout))
        .layer(sleepy(ms(3)))
        .oneshot(get())
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    let err = AttemptTimeoutLayer::new(Some(ms(110)))
        .layer(stalled(Arc::new(())))
        .oneshot(get())
        .await
        .unwrap_err();
    assert!(is_attempt_timeout(&err), "{err}");
    let took = t0.elapsed();
    assert!(took >= ms(110) && took < ms(1500), "{took:?}");
}

/// Many runtimes made and dropped on one thread, current-thread and multi-thread alternately,
/// with a paused one between them: every attempt is bounded, the paused runtime's clock does
/// not move on its own, nothing panics or hangs.
#[test]
fn words22_many_runtimes_one_thread() {
    within(Duration::from_secs(60), || {
        for i in 0..12u64 {
            let rt = if i % 2 == 0 {
                current_rt()
            } else {
                multi_rt(2)
            };
            rt.block_on(one_round(Duration::from_millis(200 + 100 * i)));
            drop(rt);
            if i % 3 == 0 {
                let paused = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .start_paused(true)
                    .build()
                    .unwrap();
                paused.block_on(async {
                    let t0 = Instant::now();
                    let err = AttemptTimeoutLayer::new(Some(Duration::from_secs(3)))
                        .layer(sleepy(Duration::from_secs(9)))
                        .oneshot(get())
                        .await
                        .unwrap_err();
                    assert!(is_attempt_timeout(&err));
                    assert_eq!(t0.elapsed(), Duration::from_secs(3));
                    tokio::time::advance(Duration::from_secs(3600)).await;
                    AttemptTimeoutLayer::new(Some(Duration::from_secs(3)))
                        .layer(sleepy(Duration::from_secs(1)))
                        .oneshot(get())
                        .await
                        .unwrap();
                    assert_eq!(paused_clock_jump().await, Duration::ZERO);
                });
            }
        }
    });
}

/// Runtimes on many threads at once (`std::thread::scope`), each thread making and dropping
/// several; the threads exit after their runtimes are gone.
#[test]
fn words22_runtimes_on_scoped_threads() {
    within(Duration::from_secs(60), || {
        std::thread::scope(|s| {
            for t in 0..4u64 {
                s.spawn(move || {
                    for i in 0..4u64 {
                        let rt = if (t + i) % 2 == 0 {
                            current_rt()
                        } else {
                            multi_rt(1)
                        };
                        rt.block_on(one_round(Duration::from_millis(200 + 50 * t)));
                    }
                });
            }
        });
    });
}

/// One multi-thread runtime driven from many plain threads with `Handle::block_on`, and from
/// `spawn_blocking` threads: the threads end while the runtime lives on, and the runtime's
/// attempts stay bounded afterwards.
#[test]
fn words22_handle_block_on_threads_exit_runtime_lives() {
    within(Duration::from_secs(60), || {
        let rt = multi_rt(2);
        let handle = rt.handle().clone();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let handle = handle.clone();
                s.spawn(move || handle.block_on(one_round(Duration::from_millis(300 + 100 * t))));
            }
        });
        rt.block_on(async {
            let mut joins = Vec::new();
            for t in 0..4u64 {
                joins.push(tokio::task::spawn_blocking(move || {
                    tokio::runtime::Handle::current()
                        .block_on(one_round(Duration::from_millis(250 + 10 * t)));
                }));
            }
            for j in joins {
                j.await.unwrap();
            }
            one_round(Duration::from_secs(1)).await;
        });
        drop(rt);
    });
}

/// A runtime shut down while attempts wait (on its workers and on `block_on`): the shutdown
/// ends promptly, every waiting attempt's future is dropped, and a new runtime on the same
/// thread works.
#[test]
fn words22_shutdown_while_attempts_wait() {
    within(Duration::from_secs(60), || {
        let held = Arc::new(());
        let rt = multi_rt(2);
        for _ in 0..8 {
            let svc = boxed(
                AttemptTimeoutLayer::new(Some(Duration::from_secs(30)))
                    .layer(stalled(held.clone())),
            );
            rt.spawn(async move {
                let _ = svc.oneshot(get()).await;
            });
        }
        let svc =
            AttemptTimeoutLayer::new(Some(Duration::from_secs(30))).layer(stalled(held.clone()));
        rt.block_on(async move {
            // Leave one attempt of this thread waiting when block_on returns.
            let _ = tokio::time::timeout(ms(50), svc.oneshot(get())).await;
        });
        let t0 = std::time::Instant::now();
        rt.shutdown_timeout(Duration::from_secs(5));
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "a waiting attempt outlived its runtime"
        );
        let rt = current_rt();
        rt.block_on(one_round(Duration::from_millis(400)));
    });
}

/// A dropped runtime is not kept alive by the thread that ran it: what the runtime owns (here a
/// callback given to its builder) is freed when it is dropped. PERFORMANCE.md: the floor keeps
/// nothing alive.
#[test]
fn words22_dropped_runtime_not_kept_by_its_thread() {
    within(Duration::from_secs(30), || {
        let marker = Arc::new(());
        let (m1, m2) = (marker.clone(), marker.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(move || {
                let _ = &m1;
            })
            .on_thread_start(move || {
                let _ = &m2;
            })
            .build()
            .unwrap();
        rt.block_on(async {
            AttemptTimeoutLayer::new(Some(Duration::from_secs(20)))
                .layer(sleepy(ms(20)))
                .oneshot(get())
                .await
                .unwrap();
        });
        drop(rt);
        assert_eq!(
            Arc::strong_count(&marker),
            1,
            "the dropped runtime's builder callbacks are still alive"
        );
    });
}

/// The same with a multi-thread runtime whose `block_on` ran the waiting attempt.
#[test]
fn words22_dropped_multi_thread_runtime_not_kept_by_block_on_thread() {
    within(Duration::from_secs(30), || {
        let marker = Arc::new(());
        let m1 = marker.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_park(move || {
                let _ = &m1;
            })
            .build()
            .unwrap();
        rt.block_on(async {
            AttemptTimeoutLayer::new(Some(Duration::from_secs(20)))
                .layer(sleepy(ms(20)))
                .oneshot(get())
                .await
                .unwrap();
        });
        drop(rt);
        assert_eq!(
            Arc::strong_count(&marker),
            1,
            "the dropped runtime's builder callbacks are still alive"
        );
    });
}

/// Control for the test above: the same runtime and call without an attempt timeout frees the
/// runtime's callbacks when it is dropped.
#[test]
fn words22_control_dropped_runtime_freed_without_timer() {
    within(Duration::from_secs(30), || {
        let marker = Arc::new(());
        let (m1, m2) = (marker.clone(), marker.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(move || {
                let _ = &m1;
            })
            .on_thread_start(move || {
                let _ = &m2;
            })
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), sleepy(ms(20)).oneshot(get()))
                .await
                .unwrap()
                .unwrap();
        });
        drop(rt);
        assert_eq!(Arc::strong_count(&marker), 1);
    });
}

/// Once the floor of a dropped runtime is over, the next waiting attempt (on a new runtime, on
/// the same thread) re-arms it there and lets the old runtime go; no panic on the way.
#[test]
fn words22_floor_rearmed_on_new_runtime_frees_old() {
    within(Duration::from_secs(30), || {
        let marker = Arc::new(());
        let m1 = marker.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(move || {
                let _ = &m1;
            })
            .build()
            .unwrap();
        rt.block_on(async {
            AttemptTimeoutLayer::new(Some(ms(200)))
                .layer(sleepy(ms(10)))
                .oneshot(get())
                .await
                .unwrap();
        });
        drop(rt);
        let rt = current_rt();
        rt.block_on(async {
            for _ in 0..3 {
                AttemptTimeoutLayer::new(Some(ms(200)))
                    .layer(sleepy(ms(10)))
                    .oneshot(get())
                    .await
                    .unwrap();
            }
        });
        assert_eq!(Arc::strong_count(&marker), 1);
        rt.block_on(one_round(ms(300)));
    });
}

/// A thread that ran a waiting attempt ends, with its runtime dropped first or still alive
/// elsewhere: its thread-local state goes without a panic (a panic there would abort).
#[test]
fn words22_thread_exit_after_runtime_gone_or_alive() {
    within(Duration::from_secs(30), || {
        std::thread::spawn(|| {
            let rt = current_rt();
            rt.block_on(one_round(ms(500)));
            drop(rt);
        })
        .join()
        .unwrap();
        let rt = multi_rt(1);
        let h = rt.handle().clone();
        std::thread::spawn(move || h.block_on(one_round(ms(500))))
            .join()
            .unwrap();
        rt.block_on(one_round(ms(500)));
        let h = rt.handle().clone();
        drop(rt);
        // A thread entering a runtime that is gone: the call fails or panics inside the thread as
        // tokio decides, but joining it does not hang.
        let _ = std::thread::spawn(move || {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                h.block_on(async { tokio::time::sleep(ms(1)).await });
            }));
        })
        .join();
    });
}

// ---------------------------------------------------------------------------------------------
// The wire: real hyper servers on loopback
// ---------------------------------------------------------------------------------------------

async fn server() -> SocketAddr {
    let app = Router::new()
        .route("/ok", get_route(|| async { "ok" }))
        .route(
            "/slow",
            get_route(|| async {
                tokio::time::sleep(ms(120)).await;
                "slow"
            }),
        )
        .route(
            "/stall",
            get_route(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

fn req_to(addr: SocketAddr, path: &str) -> Req {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap()
}

/// Through `ClientBuilder` over hyper-util on loopback: a stalled server is cut at about the
/// configured time (not early, not late) after many quick calls armed the floor; a request's
/// shorter timeout is its bound; a slow-but-in-time server is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words22_wire_client_builder_bounds() {
    let addr = server().await;
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = ClientBuilder::new()
        .without_retry()
        .with_attempt_timeout(ms(300))
        .build(http);
    for _ in 0..20 {
        let res = client.clone().oneshot(req_to(addr, "/ok")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    for _ in 0..3 {
        let res = client.clone().oneshot(req_to(addr, "/slow")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let t0 = std::time::Instant::now();
    let err = client
        .clone()
        .oneshot(req_to(addr, "/stall"))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert!(is_attempt_timeout(&err), "{err}");
    assert!(took >= ms(300) && took < ms(1200), "{took:?}");
    assert!(err.to_string().contains("300ms"), "{err}");

    let mut req = req_to(addr, "/stall");
    req.extensions_mut()
        .insert(CallOptions::new().with_attempt_timeout(ms(150)));
    let t0 = std::time::Instant::now();
    let err = client.clone().oneshot(req).await.unwrap_err();
    let took = t0.elapsed();
    assert!(is_attempt_timeout(&err), "{err}");
    assert!(took >= ms(150) && took < ms(1000), "{took:?}");
}

/// On a current-thread runtime (server and client on one thread, as in `#[tokio::main]` with
/// `flavor = "current_thread"`), the retry layer's own timer under Buffer and ConcurrencyLimit(1),
/// driven as a kept service: each call to the stalled route is cut at about its timeout.
#[tokio::test(flavor = "current_thread")]
async fn words22_wire_retry_timer_kept_service_current_thread() {
    let addr = server().await;
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut svc = ServiceBuilder::new()
        .buffer(4)
        .concurrency_limit(1)
        .layer(
            RetryLayer::new()
                .with_attempt_timeout(ms(200))
                .with_max_attempts(1),
        )
        .service(http);
    for _ in 0..10 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(req_to(addr, "/ok"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(req_to(addr, "/stall"))
            .await
            .unwrap_err();
        let took = t0.elapsed();
        assert!(is_attempt_timeout(&err), "{err}");
        assert!(took >= ms(200) && took < ms(1000), "{took:?}");
    }
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(req_to(addr, "/slow"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// Many concurrent callers on a multi-thread runtime, each cut at about its own timeout (under
/// tower's Timeout, which is longer and must not fire first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words22_wire_concurrent_callers_each_bounded() {
    let addr = server().await;
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(5))
        .layer(AttemptTimeoutLayer::new(Some(Duration::from_secs(10))))
        .service(http);
    let mut joins = Vec::new();
    for i in 0..8u64 {
        let svc = svc.clone();
        joins.push(tokio::spawn(async move {
            let t = ms(150 + 40 * i);
            let mut req = req_to(addr, "/stall");
            req.extensions_mut()
                .insert(CallOptions::new().with_attempt_timeout(t));
            let t0 = std::time::Instant::now();
            let err = svc.oneshot(req).await.unwrap_err();
            (t, t0.elapsed(), err.to_string())
        }));
    }
    for j in joins {
        let (t, took, msg) = j.await.unwrap();
        assert!(msg.contains("timed out after"), "{msg}");
        assert!(took >= t && took < t + ms(900), "{t:?}: {took:?}");
    }
}
