//! Outside tests of `sturdy.retry.delay`'s `sturdy.delay.source` label (docs/guides/metrics.md):
//! "`sturdy.delay.source` (`backoff`, `retry_after`, `rate_limit`, `breaker`)", on paused time.
#![cfg(feature = "full")]

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::events::Event;
use sturdy::core::trace::DelaySource;
use sturdy::core::BoxError;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceBuilder, ServiceExt};

type Body = Full<Bytes>;
type Api = BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;

fn get() -> Request<Body> {
    Request::get("http://api.test:8080/x")
        .body(Body::default())
        .unwrap()
}

/// An API: the n-th call (from 0) answers `f(n)` (a status and a Retry-After, or an io error).
fn api(
    f: impl Fn(usize) -> Result<(u16, Option<&'static str>), io::ErrorKind> + Send + Sync + 'static,
) -> Api {
    let n = Arc::new(AtomicUsize::new(0));
    let f = Arc::new(f);
    BoxCloneSyncService::new(tower::service_fn(move |_req: Request<Body>| {
        let out = f(n.fetch_add(1, Ordering::SeqCst));
        async move {
            match out {
                Ok((s, ra)) => {
                    let mut b = Response::builder().status(s);
                    if let Some(ra) = ra {
                        b = b.header("retry-after", ra);
                    }
                    Ok(b.body(Body::default()).unwrap())
                }
                Err(k) => Err::<_, BoxError>(Box::new(io::Error::new(k, "x"))),
            }
        }
    }))
}

/// The `sturdy.delay.source` values of every `sturdy.retry.delay` sample, and the label sets.
fn delay_sources(snap: &Snapshotter) -> Vec<(String, Vec<(String, String)>, usize)> {
    let mut out = Vec::new();
    for (key, _unit, _desc, value) in snap.snapshot().into_vec() {
        if key.key().name() != "sturdy.retry.delay" {
            continue;
        }
        let labels: Vec<(String, String)> = key
            .key()
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        let source = labels
            .iter()
            .find(|(k, _)| k == "sturdy.delay.source")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let n = match value {
            DebugValue::Histogram(v) => v.len(),
            _ => 0,
        };
        out.push((source, labels, n));
    }
    out
}

/// Runs `call` under a local debugging recorder with the retry layer's events kept.
async fn run(
    svc: impl FnOnce(RetryLayer) -> Api,
    retry: RetryLayer,
) -> (
    Vec<(String, Vec<(String, String)>, usize)>,
    Vec<DelaySource>,
) {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let events: Arc<Mutex<Vec<DelaySource>>> = Arc::default();
    let e = events.clone();
    let retry = retry.on_event(move |ev: &Event<'_>| {
        if let Event::RetryScheduled { source, .. } = ev {
            e.lock().unwrap().push(*source);
        }
    });
    let s = svc(retry);
    let _ = s.clone().oneshot(get()).await;
    let _ = s.oneshot(get()).await;
    let ev = events.lock().unwrap().clone();
    (delay_sources(&snap), ev)
}

fn has(sources: &[(String, Vec<(String, String)>, usize)], value: &str) -> bool {
    sources.iter().any(|(s, _, n)| s == value && *n > 0)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn backoff_label_after_a_503() {
    let (m, ev) = run(
        |retry| {
            BoxCloneSyncService::new(
                retry.layer(api(|n| Ok((if n == 0 { 503 } else { 200 }, None)))),
            )
        },
        RetryLayer::new().with_seed(1),
    )
    .await;
    assert_eq!(ev, vec![DelaySource::Backoff]);
    assert!(has(&m, "backoff"), "{m:?}");
    let (_, labels, _) = &m[0];
    for want in ["server.address", "server.port", "http.request.method"] {
        assert!(labels.iter().any(|(k, _)| k == want), "{labels:?}");
    }
    assert!(
        labels.contains(&("server.address".into(), "api.test".into())),
        "{labels:?}"
    );
    assert!(
        labels.contains(&("server.port".into(), "8080".into())),
        "{labels:?}"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn backoff_label_after_a_reset() {
    let (m, ev) = run(
        |retry| {
            BoxCloneSyncService::new(retry.layer(api(|n| {
                if n == 0 {
                    Err(io::ErrorKind::ConnectionReset)
                } else {
                    Ok((200, None))
                }
            })))
        },
        RetryLayer::new().with_seed(1),
    )
    .await;
    assert_eq!(ev, vec![DelaySource::Backoff]);
    assert!(has(&m, "backoff"), "{m:?}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retry_after_label_after_a_503_with_retry_after() {
    for status in [503, 429] {
        let (m, ev) = run(
            |retry| {
                BoxCloneSyncService::new(retry.layer(api(move |n| {
                    Ok(if n == 0 {
                        (status, Some("2"))
                    } else {
                        (200, None)
                    })
                })))
            },
            RetryLayer::new().with_seed(1),
        )
        .await;
        assert_eq!(ev, vec![DelaySource::RetryAfter], "{status}");
        assert!(has(&m, "retry_after"), "{status}: {m:?}");
    }
}

/// A limiter's refusal (`RateLimited`, `max_wait` zero) retried after the wait it carries.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn rate_limit_label_after_a_limiter_refusal() {
    let (m, ev) = run(
        |retry| {
            BoxCloneSyncService::new(
                ServiceBuilder::new()
                    .layer(retry)
                    .layer(
                        RateLimitLayer::new(Quota::per_second(1).unwrap())
                            .with_max_wait(Duration::ZERO),
                    )
                    .service(api(|_| Ok((200, None)))),
            )
        },
        RetryLayer::new().with_seed(1),
    )
    .await;
    assert_eq!(ev, vec![DelaySource::RateLimit]);
    assert!(has(&m, "rate_limit"), "{m:?}");
}

/// An open breaker below, waited out within the deadline.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn breaker_label_when_waiting_out_an_open_breaker() {
    let (m, ev) = run(
        |retry| {
            BoxCloneSyncService::new(
                ServiceBuilder::new()
                    .layer(retry)
                    .layer(
                        CircuitBreakerLayer::new()
                            .with_consecutive_failures(1)
                            .with_open_duration(Duration::from_secs(2), Duration::from_secs(2)),
                    )
                    .service(api(|n| Ok((if n == 0 { 503 } else { 200 }, None)))),
            )
        },
        RetryLayer::new()
            .with_seed(1)
            .with_deadline(Duration::from_secs(30)),
    )
    .await;
    assert!(ev.contains(&DelaySource::Breaker), "{ev:?}");
    assert!(has(&m, "breaker"), "{m:?}");
    // Only the four documented values ever appear.
    for (s, _, _) in &m {
        assert!(
            ["backoff", "retry_after", "rate_limit", "breaker"].contains(&s.as_str()),
            "{s}"
        );
    }
}

/// The same label on every sample the event reports: as many samples as `RetryScheduled` events.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn one_delay_sample_per_retry_event() {
    let (m, ev) = run(
        |retry| {
            BoxCloneSyncService::new(retry.layer(api(|n| {
                Ok(match n {
                    0 => (503, None),
                    1 => (429, Some("1")),
                    2 => (502, None),
                    _ => (200, None),
                })
            })))
        },
        RetryLayer::new().with_seed(1),
    )
    .await;
    assert_eq!(
        ev,
        vec![
            DelaySource::Backoff,
            DelaySource::RetryAfter,
            DelaySource::Backoff
        ]
    );
    let total: usize = m.iter().map(|(_, _, n)| n).sum();
    assert_eq!(total, 3, "{m:?}");
}
