//! docs/guides/metrics.md's table read row by row for states and sources other tests leave out:
//! `sturdy.circuit.open` ("1 while the breaker refuses calls (open, forced open), 0 otherwise")
//! through half-open and a failed probe; `sturdy.circuit.transitions`' `half_open` and
//! `forced_open`; `sturdy.ratelimit.pauses`' `sturdy.pause.source` for each header and for bare
//! 429s and 503s; `sturdy.ratelimit.pause.duration` after the cap; the token endpoint's labels.
//! Paused time, a `DebuggingRecorder` local to the test's thread.
#![cfg(feature = "full")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use sturdy::auth::ClientCredentials;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::BoxError;
use sturdy::ratelimit::RateLimitLayer;
use tower::{Layer, ServiceExt};

type Req = Request<Full<Bytes>>;

#[derive(Debug)]
struct M {
    name: String,
    labels: BTreeMap<String, String>,
    value: DebugValue,
}

fn take(snap: &Snapshotter) -> Vec<M> {
    snap.snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _, _, value)| {
            let (_, key) = ck.into_parts();
            M {
                name: key.name().to_owned(),
                labels: key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect(),
                value,
            }
        })
        .filter(|m| match &m.value {
            DebugValue::Counter(n) => *n > 0,
            DebugValue::Histogram(v) => !v.is_empty(),
            DebugValue::Gauge(_) => true,
        })
        .collect()
}

fn gauge(ms: &[M], name: &str) -> Option<f64> {
    ms.iter().find(|m| m.name == name).map(|m| match m.value {
        DebugValue::Gauge(v) => v.into_inner(),
        ref v => panic!("{name} is not a gauge: {v:?}"),
    })
}

fn counters(ms: &[M], name: &str) -> Vec<(BTreeMap<String, String>, u64)> {
    ms.iter()
        .filter(|m| m.name == name)
        .map(|m| match m.value {
            DebugValue::Counter(n) => (m.labels.clone(), n),
            ref v => panic!("{name} is not a counter: {v:?}"),
        })
        .collect()
}

fn get(uri: &str) -> Req {
    Request::get(uri).body(Full::default()).unwrap()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn client26_open_gauge_through_half_open_and_a_failed_probe() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let failing = Arc::new(AtomicBool::new(true));
    let f = failing.clone();
    let api = tower::service_fn(move |_r: Req| {
        let s = if f.load(Ordering::SeqCst) { 503 } else { 200 };
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, BoxError>(
                Response::builder()
                    .status(s)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let svc = layer.layer(api);
    let uri = "http://api.test:8080/x";
    let _ = svc.clone().oneshot(get(uri)).await.unwrap();
    let ms = take(&snap);
    assert_eq!(
        gauge(&ms, "sturdy.circuit.open"),
        Some(1.0),
        "open: {ms:#?}"
    );

    // Half-open: the probe is out. The breaker refuses others, but the guide says 0 otherwise.
    tokio::time::advance(Duration::from_millis(1001)).await;
    let probe = tokio::spawn(svc.clone().oneshot(get(uri)));
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_millis(10)).await;
    let ms = take(&snap);
    let states: Vec<String> = counters(&ms, "sturdy.circuit.transitions")
        .into_iter()
        .filter_map(|(l, _)| l.get("sturdy.circuit.state").cloned())
        .collect();
    assert!(states.contains(&"half_open".to_string()), "{states:?}");
    assert_eq!(
        gauge(&ms, "sturdy.circuit.open"),
        Some(0.0),
        "half-open: {:?}",
        handle.state("api.test:8080")
    );
    // The probe fails: open again, 1.
    let _ = probe.await.unwrap();
    let ms = take(&snap);
    assert_eq!(gauge(&ms, "sturdy.circuit.open"), Some(1.0));
    // Next probe succeeds: closed, 0.
    failing.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_millis(1001)).await;
    svc.clone().oneshot(get(uri)).await.unwrap();
    let ms = take(&snap);
    assert_eq!(gauge(&ms, "sturdy.circuit.open"), Some(0.0));
    // Forced open: 1, with a `forced_open` transition; released: 0.
    handle.force_open("api.test:8080");
    let ms = take(&snap);
    assert_eq!(gauge(&ms, "sturdy.circuit.open"), Some(1.0));
    let forced: u64 = counters(&ms, "sturdy.circuit.transitions")
        .into_iter()
        .filter(|(l, _)| l.get("sturdy.circuit.state").map(String::as_str) == Some("forced_open"))
        .map(|(l, n)| {
            assert_eq!(
                l.get("server.address").map(String::as_str),
                Some("api.test")
            );
            assert_eq!(l.get("server.port").map(String::as_str), Some("8080"));
            n
        })
        .sum();
    assert_eq!(forced, 1, "{ms:#?}");
    handle.force_close("api.test:8080");
    let ms = take(&snap);
    assert_eq!(gauge(&ms, "sturdy.circuit.open"), Some(0.0));
}

/// Each source of a pause, with the status that asked.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn client26_pause_sources_and_capped_durations() {
    let cases: Vec<(u16, Vec<(&str, &str)>, bool, &str, f64)> = vec![
        (429, vec![("retry-after", "7")], false, "retry_after", 7.0),
        (503, vec![("retry-after", "7")], false, "retry_after", 7.0),
        (
            200,
            vec![("ratelimit", r#""d";r=0;t=9"#)],
            false,
            "ratelimit",
            9.0,
        ),
        (
            200,
            vec![("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "11")],
            false,
            "x_ratelimit",
            11.0,
        ),
        (429, vec![], false, "default", 1.0),
        (503, vec![], true, "default", 1.0),
        (
            429,
            vec![("retry-after", "99999999999999999999")],
            false,
            "retry_after",
            300.0,
        ),
        (
            200,
            vec![("ratelimit", r#""d";r=0;t=99999999999"#)],
            false,
            "ratelimit",
            300.0,
        ),
    ];
    for (status, headers, bare503, source, secs) in cases {
        let rec = DebuggingRecorder::new();
        let snap = rec.snapshotter();
        let _g = metrics::set_default_local_recorder(&rec);
        let hs: Vec<(String, String)> = headers
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let api = tower::service_fn(move |_r: Req| {
            let hs = hs.clone();
            async move {
                let mut b = Response::builder().status(status);
                for (n, v) in &hs {
                    b = b.header(n.as_str(), v.as_str());
                }
                Ok::<_, BoxError>(b.body(Full::<Bytes>::default()).unwrap())
            }
        });
        let svc = RateLimitLayer::adaptive_only()
            .with_bare_503_pauses(bare503)
            .layer(api);
        let _ = svc.oneshot(get("http://api.test/x")).await.unwrap();
        let ms = take(&snap);
        let pauses = counters(&ms, "sturdy.ratelimit.pauses");
        assert_eq!(pauses.len(), 1, "{status} {headers:?}: {ms:#?}");
        let (l, n) = &pauses[0];
        assert_eq!(*n, 1);
        assert_eq!(
            l.get("sturdy.pause.source").map(String::as_str),
            Some(source),
            "{status} {headers:?}"
        );
        assert_eq!(
            l.get("http.response.status_code").map(String::as_str),
            Some(status.to_string().as_str())
        );
        let d: Vec<f64> = ms
            .iter()
            .filter(|m| m.name == "sturdy.ratelimit.pause.duration")
            .flat_map(|m| match &m.value {
                DebugValue::Histogram(v) => v.iter().map(|x| x.into_inner()).collect(),
                _ => vec![],
            })
            .collect();
        assert_eq!(d.len(), 1, "{status} {headers:?}");
        assert!((d[0] - secs).abs() < 0.01, "{status} {headers:?}: {d:?}");
    }
}

/// The token endpoint's labels: host and port split, never the user info; failures by kind.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn client26_token_metrics_labels() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let ok = Arc::new(AtomicBool::new(false));
    let o = ok.clone();
    let endpoint = tower::service_fn(move |_r: Req| {
        let good = o.load(Ordering::SeqCst);
        async move {
            if good {
                Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(
                    r#"{"access_token":"t","token_type":"Bearer","expires_in":3600}"#,
                )))
            } else {
                Ok(Response::builder()
                    .status(503)
                    .body(Full::<Bytes>::from("busy"))
                    .unwrap())
            }
        }
    });
    let src = ClientCredentials::new(
        endpoint,
        "https://me:pw@auth.test:8443/oauth/token?key=abc",
        "id",
        "secret",
    )
    .unwrap();
    assert!(src.get().await.is_err());
    tokio::time::advance(Duration::from_secs(2)).await;
    ok.store(true, Ordering::SeqCst);
    src.get().await.unwrap();
    let ms = take(&snap);
    let want: BTreeMap<String, String> = [
        ("server.address".to_string(), "auth.test".to_string()),
        ("server.port".to_string(), "8443".to_string()),
    ]
    .into_iter()
    .collect();
    let fetches = counters(&ms, "sturdy.auth.token.fetches");
    assert_eq!(fetches, vec![(want.clone(), 1)], "{ms:#?}");
    let mut fail_labels = want;
    fail_labels.insert("error.type".into(), "503".into());
    let failures = counters(&ms, "sturdy.auth.token.failures");
    assert_eq!(failures, vec![(fail_labels, 1)], "{ms:#?}");
}
