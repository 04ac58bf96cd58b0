//! The attempt timer: the floor timer that keeps a waiting attempt from waking the runtime's
//! driver must not be seen on a paused clock, and must not outlive or confuse its runtime.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy_retry::{AttemptTimeoutLayer, RetryLayer};
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

/// Answers at its second poll, so that the attempt waits and makes its timer.
async fn answers_after_a_yield(
    _req: Request<Full<Bytes>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    tokio::task::yield_now().await;
    Ok(Response::new(Full::default()))
}

/// Never answers.
async fn never_answers(_req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    std::future::pending().await
}

/// Waits for a real 20 ms on another thread: the runtime is idle meanwhile, with no timer of its
/// own pending.
async fn idle_for_a_moment() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(20));
        let _ = tx.send(());
    });
    rx.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_paused_clock_is_not_moved_by_an_attempt_that_waited() {
    let svc = AttemptTimeoutLayer::new(Some(Duration::from_secs(30)))
        .layer(service_fn(answers_after_a_yield));
    svc.clone()
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    let retried = RetryLayer::new()
        .with_attempt_timeout(Duration::from_secs(30))
        .layer(service_fn(answers_after_a_yield));
    retried
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();

    // A timer left pending would make tokio auto-advance the idle, paused clock to it.
    let before = Instant::now();
    idle_for_a_moment().await;
    assert_eq!(
        Instant::now(),
        before,
        "no timer of sturdy's is left pending"
    );
}

/// One thread, one runtime after another: the attempts of each are bounded by their timeout, and
/// nothing kept from a runtime that is gone breaks the next one or the thread's exit.
#[test]
fn attempts_on_one_thread_across_runtimes_keep_their_bound() {
    std::thread::spawn(|| {
        for flavor in ["current_thread", "multi_thread", "current_thread"] {
            let rt = match flavor {
                "current_thread" => tokio::runtime::Builder::new_current_thread(),
                _ => tokio::runtime::Builder::new_multi_thread(),
            }
            .enable_all()
            .build()
            .unwrap();
            rt.block_on(async {
                let timeout = AttemptTimeoutLayer::new(Some(Duration::from_millis(150)));
                let retried = RetryLayer::new()
                    .with_max_attempts(1)
                    .with_attempt_timeout(Duration::from_millis(150));
                for _ in 0..3 {
                    timeout
                        .layer(service_fn(answers_after_a_yield))
                        .oneshot(Request::new(Full::default()))
                        .await
                        .unwrap();
                    retried
                        .layer(service_fn(answers_after_a_yield))
                        .oneshot(Request::new(Full::default()))
                        .await
                        .unwrap();
                }
                let start = Instant::now();
                let err = timeout
                    .layer(service_fn(never_answers))
                    .oneshot(Request::new(Full::default()))
                    .await
                    .unwrap_err();
                assert_eq!(err.to_string(), "the attempt timed out after 150ms");
                let err = retried
                    .layer(service_fn(never_answers))
                    .oneshot(Request::new(Full::default()))
                    .await
                    .unwrap_err();
                assert!(err.to_string().contains("timed out after 150ms"), "{err}");
                let took = start.elapsed();
                assert!(
                    took >= Duration::from_millis(300) && took < Duration::from_secs(5),
                    "{flavor}: two attempts of 150 ms took {took:?}"
                );
            });
            drop(rt);
        }
    })
    .join()
    .expect("the thread ran and exited without a panic");
}
