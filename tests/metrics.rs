//! Events and metrics of the composed client stack, on paused time: a scripted run whose
//! retries, pause, breaker opening and rejection are seen by a `metrics` recorder and by the
//! layers' `on_event` callbacks.

#![cfg(feature = "full")]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use metrics::{SharedString, Unit};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::CompositeKey;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::events::{BreakerState, Event, RetryStop};
use sturdy::core::headers::PauseSource;
use sturdy::core::trace::DelaySource;
use sturdy::core::{CallOptions, CircuitOpen, ErrorKind};
use sturdy::ratelimit::RateLimitLayer;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tower::{service_fn, ServiceExt};

/// An owned copy of the events a test looks at.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Retry {
        host: String,
        attempt: u32,
        reason: ErrorKind,
        source: DelaySource,
        delay: Duration,
    },
    Stopped {
        stop: RetryStop,
    },
    Paused {
        host: Option<String>,
        status: StatusCode,
        source: Option<PauseSource>,
        pause: Duration,
    },
    Circuit {
        from: BreakerState,
        to: BreakerState,
    },
    Rejected {
        key: String,
    },
    Other(String),
}

fn owned(e: &Event<'_>) -> Seen {
    match *e {
        Event::RetryScheduled {
            host,
            attempt,
            reason,
            delay,
            source,
            ..
        } => Seen::Retry {
            host: host.to_owned(),
            attempt,
            reason: reason.clone(),
            source,
            delay,
        },
        Event::RetryStopped { stop, .. } => Seen::Stopped { stop },
        Event::RateLimitPaused {
            host,
            status,
            source,
            pause,
            ..
        } => Seen::Paused {
            host: host.map(str::to_owned),
            status,
            source,
            pause,
        },
        Event::CircuitChanged { from, to, .. } => Seen::Circuit { from, to },
        Event::CircuitRejected { key, .. } => Seen::Rejected {
            key: key.to_owned(),
        },
        ref other => Seen::Other(format!("{other:?}")),
    }
}

/// A server that answers each call with the next scripted status (`Retry-After: 1` on a 429).
fn scripted(
    script: &[u16],
) -> (
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Arc<Mutex<VecDeque<u16>>>,
) {
    let left = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
    let l = left.clone();
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let status = l.lock().unwrap().pop_front().unwrap_or(200);
        async move {
            let mut res = Response::new(Full::default());
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            if status == 429 {
                res.headers_mut()
                    .insert(http::header::RETRY_AFTER, "1".parse().unwrap());
            }
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    (svc, left)
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://api.example.com:8080{path}"))
        .body(Full::default())
        .unwrap()
}

/// One snapshot (taking one resets the recorder's counters).
type Metrics = Vec<(CompositeKey, Option<Unit>, Option<SharedString>, DebugValue)>;

fn counter(all: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    all.iter()
        .filter(|(k, ..)| {
            let key = k.key();
            key.name() == name
                && labels
                    .iter()
                    .all(|(n, v)| key.labels().any(|l| l.key() == *n && l.value() == *v))
        })
        .map(|(.., v)| match v {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

/// The script: call A meets a 503 (retried after the backoff), then a 429 with `Retry-After: 1`
/// (the host is paused, and the retry waits for it), then succeeds. Calls B and C, each allowed
/// one attempt, meet a 503 each: the breaker (two failures in a row) opens. Call D is refused by
/// the open breaker without reaching the server.
#[tokio::test(start_paused = true)]
async fn a_recorder_and_the_callbacks_see_a_scripted_run() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    // This thread's recorder: the test runs on a current-thread runtime, so every layer records
    // here, and other tests in this binary do not.
    let _guard = metrics::set_default_local_recorder(&recorder);

    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook = |seen: &Arc<Mutex<Vec<Seen>>>| {
        let seen = seen.clone();
        move |e: &Event<'_>| seen.lock().unwrap().push(owned(e))
    };
    let backoff =
        Backoff::decorrelated_jitter(Duration::from_millis(10), Duration::from_millis(100))
            .unwrap();
    let (http, left) = scripted(&[503, 429, 200, 503, 503]);
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_backoff(backoff)
                .with_seed(7)
                .on_event(hook(&seen)),
        )
        .with_circuit_breaker(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(2)
                .on_event(hook(&seen)),
        )
        .with_rate_limit(RateLimitLayer::adaptive_only().on_event(hook(&seen)))
        .build(http);

    let started = tokio::time::Instant::now();
    let a = client.clone().oneshot(get("/a")).await.unwrap();
    assert_eq!(a.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited for Retry-After"
    );
    for path in ["/b", "/c"] {
        let mut req = get(path);
        req.extensions_mut()
            .insert(CallOptions::new().with_max_attempts(1));
        let res = client.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let err = client.clone().oneshot(get("/d")).await.unwrap_err();
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert!(
        left.lock().unwrap().is_empty(),
        "every scripted answer used"
    );

    // The recorder: 2 retries (by reason), 1 pause, 1 opening, 1 rejection, 2 calls not retried.
    let snap = snap.snapshot().into_vec();
    let host = [
        ("server.address", "api.example.com"),
        ("server.port", "8080"),
    ];
    let retries = "sturdy.retry.retries";
    assert_eq!(counter(&snap, retries, &host), 2);
    assert_eq!(counter(&snap, retries, &[("error.type", "503")]), 1);
    assert_eq!(
        counter(&snap, retries, &[("error.type", "rate_limited")]),
        1
    );
    assert_eq!(
        counter(&snap, retries, &[("http.request.method", "GET")]),
        2
    );
    assert_eq!(
        counter(
            &snap,
            "sturdy.retry.stopped",
            &[("sturdy.retry.stop_reason", "attempts_exhausted")]
        ),
        2
    );
    assert_eq!(
        counter(
            &snap,
            "sturdy.ratelimit.pauses",
            &[
                ("server.address", "api.example.com"),
                ("sturdy.pause.source", "retry_after"),
                ("http.response.status_code", "429"),
            ]
        ),
        1
    );
    assert_eq!(
        counter(
            &snap,
            "sturdy.circuit.transitions",
            &[("sturdy.circuit.state", "open")]
        ),
        1
    );
    assert_eq!(counter(&snap, "sturdy.circuit.rejections", &host), 1);
    assert_eq!(counter(&snap, "sturdy.ratelimit.refusals", &[]), 0);
    let gauge = snap
        .iter()
        .find(|(k, ..)| k.key().name() == "sturdy.circuit.open")
        .map(|(.., v)| v);
    assert_eq!(gauge, Some(&DebugValue::Gauge(1.0.into())));

    // The callbacks: the same story, typed.
    let seen = seen.lock().unwrap().clone();
    let retries: Vec<_> = seen
        .iter()
        .filter(|s| matches!(s, Seen::Retry { .. }))
        .collect();
    assert_eq!(retries.len(), 2, "{seen:#?}");
    assert!(matches!(
        retries[0],
        Seen::Retry { host, attempt: 1, reason: ErrorKind::Server(s), source: DelaySource::Backoff, .. }
            if host == "api.example.com:8080" && *s == StatusCode::SERVICE_UNAVAILABLE
    ));
    assert!(matches!(
        retries[1],
        Seen::Retry { attempt: 2, reason: ErrorKind::RateLimited { .. }, source: DelaySource::RetryAfter, delay, .. }
            if *delay >= Duration::from_secs(1)
    ));
    assert!(seen.contains(&Seen::Paused {
        host: Some("api.example.com:8080".into()),
        status: StatusCode::TOO_MANY_REQUESTS,
        source: Some(PauseSource::RetryAfter),
        pause: Duration::from_secs(1),
    }));
    assert!(seen.contains(&Seen::Circuit {
        from: BreakerState::Closed,
        to: BreakerState::Open,
    }));
    assert!(seen.contains(&Seen::Rejected {
        key: "api.example.com:8080".into(),
    }));
    assert_eq!(
        seen.iter()
            .filter(|s| **s
                == Seen::Stopped {
                    stop: RetryStop::AttemptsExhausted
                })
            .count(),
        2
    );
}

/// A layer keyed by something other than the host never puts its key in a label.
#[tokio::test(start_paused = true)]
async fn custom_keys_are_not_labels() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let keys = Arc::new(Mutex::new(Vec::new()));
    let k = keys.clone();
    let (http, _) = scripted(&[429]);
    let client = ClientBuilder::new()
        .without_retry()
        .with_rate_limit(
            RateLimitLayer::adaptive_only()
                .with_key(|_: &Request<Full<Bytes>>| "tenant-secret-42".to_owned())
                .on_event(move |e| {
                    if let Event::RateLimitPaused { key, host, .. } = e {
                        k.lock().unwrap().push((key.to_string(), host.is_some()));
                    }
                }),
        )
        .build(http);
    let res = client.oneshot(get("/x")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(*keys.lock().unwrap(), [("tenant-secret-42".into(), false)]);
    let all = snap.snapshot().into_vec();
    let pauses: Vec<_> = all
        .iter()
        .filter(|(k, ..)| k.key().name() == "sturdy.ratelimit.pauses")
        .collect();
    assert_eq!(pauses.len(), 1);
    for (k, ..) in &all {
        for l in k.key().labels() {
            assert!(!l.value().contains("tenant"), "{k:?}");
        }
    }
}

/// Without a callback or a recorder, the same run works as before (the events go nowhere).
#[tokio::test(start_paused = true)]
async fn without_callbacks_or_recorder_nothing_changes() {
    let (http, _) = scripted(&[503, 200]);
    let client = ClientBuilder::new().build(http);
    let res = client.oneshot(get("/a")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}
