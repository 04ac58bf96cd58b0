//! The metrics of the rate limiter, hedging and the adaptive concurrency limit, as the table in
//! docs/guides/metrics.md names them: names, label names and values, units, overflow labels.

#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use metrics::{SharedString, Unit};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use tower::{service_fn, Layer, Service, ServiceExt};

type Metrics = Vec<(CompositeKey, Option<Unit>, Option<SharedString>, DebugValue)>;

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

fn answering(
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    ms: u64,
) -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    service_fn(move |_req: Request<()>| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let mut b = Response::builder().status(status);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        Ok::<_, std::convert::Infallible>(b.body(()).unwrap())
    })
}

/// Every (name, sorted label pairs, value) recorded.
fn rows(snap: &Snapshotter) -> Vec<(String, Vec<(String, String)>, DebugValue)> {
    let all: Metrics = snap.snapshot().into_vec();
    all.into_iter()
        .map(|(k, _, _, v)| {
            let key = k.key();
            let mut labels: Vec<_> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            (key.name().to_owned(), labels, v)
        })
        .collect()
}

fn names_of(labels: &[(String, String)]) -> Vec<&str> {
    labels.iter().map(|(k, _)| k.as_str()).collect()
}

fn counter(v: &DebugValue) -> u64 {
    match v {
        DebugValue::Counter(n) => *n,
        other => panic!("not a counter: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn ratelimit_waits_refusals_and_their_labels() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::from_millis(1_500))
        .layer(answering(200, &[], 0));
    svc.clone()
        .oneshot(get("http://api.test:8443/a"))
        .await
        .unwrap();
    let w = tokio::spawn(svc.clone().oneshot(get("http://api.test:8443/a")));
    tokio::task::yield_now().await;
    let _ = svc
        .clone()
        .oneshot(get("http://api.test:8443/a"))
        .await
        .unwrap_err();
    w.await.unwrap().unwrap();
    let rows = rows(&snap);
    let mut names: Vec<_> = rows.iter().map(|(n, ..)| n.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "sturdy.ratelimit.refusals",
            "sturdy.ratelimit.wait.duration",
            "sturdy.ratelimit.waits"
        ]
    );
    for (name, labels, value) in &rows {
        assert_eq!(
            labels,
            &[
                ("server.address".to_string(), "api.test".to_string()),
                ("server.port".to_string(), "8443".to_string())
            ],
            "{name}"
        );
        match name.as_str() {
            "sturdy.ratelimit.wait.duration" => match value {
                DebugValue::Histogram(v) => {
                    assert_eq!(v.len(), 1);
                    assert!(
                        (v[0].0 - 1.0).abs() < 1e-9,
                        "the expected wait in seconds: {v:?}"
                    );
                }
                other => panic!("{other:?}"),
            },
            _ => assert_eq!(counter(value), 1, "{name}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn ratelimit_pause_sources_are_the_documented_label_values() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let cases: [(u16, &'static [(&'static str, &'static str)], &str); 4] = [
        (429, &[("retry-after", "3")], "retry_after"),
        (200, &[("ratelimit", "\"d\";r=0;t=3")], "ratelimit"),
        (
            200,
            &[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "3")],
            "x_ratelimit",
        ),
        (429, &[], "default"),
    ];
    for (i, (status, headers, _)) in cases.iter().enumerate() {
        RateLimitLayer::adaptive_only()
            .layer(answering(*status, headers, 0))
            .oneshot(get(&format!("http://h{i}.test/")))
            .await
            .unwrap();
    }
    let rows = rows(&snap);
    for (i, (status, _, source)) in cases.iter().enumerate() {
        let host = format!("h{i}.test");
        let pause = rows
            .iter()
            .find(|(n, l, _)| {
                n == "sturdy.ratelimit.pauses"
                    && l.iter().any(|(k, v)| k == "server.address" && *v == host)
            })
            .unwrap_or_else(|| panic!("a pause counted for {host}: {rows:?}"));
        assert_eq!(
            names_of(&pause.1),
            [
                "http.response.status_code",
                "server.address",
                "sturdy.pause.source"
            ],
            "no server.port when the URI has none"
        );
        assert!(
            pause
                .1
                .contains(&("sturdy.pause.source".into(), (*source).into())),
            "{pause:?}"
        );
        assert!(
            pause
                .1
                .contains(&("http.response.status_code".into(), status.to_string())),
            "{pause:?}"
        );
        assert!(rows
            .iter()
            .any(|(n, l, _)| n == "sturdy.ratelimit.pause.duration"
                && l.iter().any(|(k, v)| k == "server.address" && *v == host)));
    }
}

#[tokio::test(start_paused = true)]
async fn ratelimit_capped_pause_duration_is_the_cap() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    RateLimitLayer::adaptive_only()
        .layer(answering(
            429,
            &[("retry-after", "99999999999999999999")],
            0,
        ))
        .oneshot(get("http://a.test/"))
        .await
        .unwrap();
    let rows = rows(&snap);
    let (_, _, v) = rows
        .iter()
        .find(|(n, ..)| n == "sturdy.ratelimit.pause.duration")
        .expect("a pause duration");
    match v {
        DebugValue::Histogram(v) => assert_eq!(v.iter().map(|x| x.0).collect::<Vec<_>>(), [300.0]),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn custom_keys_carry_no_server_labels_and_userinfo_never_shows() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    RateLimitLayer::adaptive_only()
        .with_key(|_r: &Request<()>| "tenant-secret-token".to_string())
        .layer(answering(429, &[], 0))
        .oneshot(get("http://a.test/"))
        .await
        .unwrap();
    RateLimitLayer::adaptive_only()
        .layer(answering(429, &[], 0))
        .oneshot(get("http://user:pw@b.test:81/path?api_key=zz"))
        .await
        .unwrap();
    let rows = rows(&snap);
    let keyed: Vec<_> = rows
        .iter()
        .filter(|(n, l, _)| n == "sturdy.ratelimit.pauses" && !l.iter().any(|(_, v)| v == "b.test"))
        .collect();
    assert_eq!(keyed.len(), 1, "{rows:?}");
    assert!(
        !names_of(&keyed[0].1)
            .iter()
            .any(|n| n.starts_with("server.")),
        "{keyed:?}"
    );
    for (_, labels, _) in &rows {
        for (_, v) in labels {
            assert!(
                !v.contains("secret")
                    && !v.contains("user")
                    && !v.contains("pw")
                    && !v.contains("api_key")
                    && !v.contains('/'),
                "{labels:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn ratelimit_overflow_is_labelled_star_without_port() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let svc = RateLimitLayer::adaptive_only()
        .with_max_keys(1)
        .layer(answering(429, &[("retry-after", "5")], 0));
    svc.clone().oneshot(get("http://a.test:81/")).await.unwrap();
    svc.clone().oneshot(get("http://b.test:82/")).await.unwrap();
    let rows = rows(&snap);
    let star: Vec<_> = rows
        .iter()
        .filter(|(n, l, _)| {
            n == "sturdy.ratelimit.pauses" && l.contains(&("server.address".into(), "*".into()))
        })
        .collect();
    assert_eq!(star.len(), 1, "{rows:?}");
    assert!(!names_of(&star[0].1).contains(&"server.port"), "{star:?}");
}

#[tokio::test(start_paused = true)]
async fn a_plain_call_records_nothing() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let svc = tower::ServiceBuilder::new()
        .layer(HedgeLayer::new())
        .layer(RateLimitLayer::new(Quota::per_second(100).unwrap()))
        .service(answering(200, &[], 1));
    svc.oneshot(get("http://a.test/")).await.unwrap();
    assert!(rows(&snap).is_empty());
}

#[tokio::test(start_paused = true)]
async fn hedge_sent_and_won_names_and_labels() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let n = Arc::new(AtomicUsize::new(0));
    let api = service_fn(move |_r: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            let ms = if i == 10 { 1_000 } else { 10 };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, std::convert::Infallible>(Response::new(()))
        }
    });
    let svc = HedgeLayer::new().with_min_samples(10).layer(api);
    for _ in 0..11 {
        svc.clone()
            .oneshot(get("http://a.test:9000/"))
            .await
            .unwrap();
    }
    let rows = rows(&snap);
    let mut got: Vec<_> = rows
        .iter()
        .map(|(n, l, v)| (n.as_str(), l.clone(), counter(v)))
        .collect();
    got.sort();
    let labels = vec![
        ("server.address".to_string(), "a.test".to_string()),
        ("server.port".to_string(), "9000".to_string()),
    ];
    assert_eq!(
        got,
        [
            ("sturdy.hedge.sent", labels.clone(), 1),
            ("sturdy.hedge.won", labels, 1)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn concurrency_limit_gauge_and_rejections() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 4)
        .with_initial_limit(2)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = layer.layer(answering(200, &[], 100));
    let a = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    let b = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    tokio::task::yield_now().await;
    let _ = svc
        .clone()
        .oneshot(get("http://a.test/"))
        .await
        .unwrap_err();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    handle.set_limit("a.test", 3);
    let rows = rows(&snap);
    let label = vec![("server.address".to_string(), "a.test".to_string())];
    let rej = rows
        .iter()
        .find(|(n, ..)| n == "sturdy.concurrency.rejections")
        .expect("a rejection counted");
    assert_eq!((&rej.1, counter(&rej.2)), (&label, 1));
    let gauge = rows
        .iter()
        .find(|(n, ..)| n == "sturdy.concurrency.limit")
        .expect("the limit gauge");
    assert_eq!(gauge.1, label);
    match &gauge.2 {
        DebugValue::Gauge(v) => assert_eq!(v.0, handle.limit("a.test").unwrap() as f64),
        other => panic!("{other:?}"),
    }
}

#[test]
fn describe_metrics_gives_seconds_to_histograms_and_count_to_the_rest() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        sturdy::core::events::describe_metrics();
        // Record one of each so the snapshot lists them with their descriptions.
        for name in [
            "sturdy.ratelimit.waits",
            "sturdy.ratelimit.refusals",
            "sturdy.ratelimit.pauses",
            "sturdy.hedge.sent",
            "sturdy.hedge.won",
            "sturdy.concurrency.rejections",
        ] {
            metrics::counter!(name).increment(1);
        }
        metrics::gauge!("sturdy.concurrency.limit").set(1.0);
        metrics::histogram!("sturdy.ratelimit.wait.duration").record(1.0);
        metrics::histogram!("sturdy.ratelimit.pause.duration").record(1.0);
    });
    let all: Metrics = snap.snapshot().into_vec();
    assert_eq!(all.len(), 9);
    for (k, unit, desc, _) in &all {
        let name = k.key().name();
        assert!(
            desc.as_ref().is_some_and(|d| !d.is_empty()),
            "{name} is described"
        );
        let expected = if k.kind() == MetricKind::Histogram {
            Unit::Seconds
        } else {
            Unit::Count
        };
        assert_eq!(unit.as_ref(), Some(&expected), "{name}");
    }
}
