//! docs/guides/metrics.md, read literally: every metric of the table described with its unit by
//! `describe_metrics`, the labels each one carries (host and port split, user info never, `_OTHER`
//! methods, error types, stop reasons, delay sources, pause sources, breaker states), no
//! `server.*` labels after `with_key`, nothing emitted on the plain path, callbacks that replace
//! each other and coexist with the recorder, and `on_event` on every layer the guide lists.
//! Current-thread runtimes with a thread-local `DebuggingRecorder`; paused time.
#![cfg(feature = "full")]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::events::{describe_metrics, Event};
use sturdy::core::BoxError;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tower::{service_fn, Layer, Service, ServiceExt};

/// A recorder that keeps what `describe_*` registers.
#[derive(Default)]
struct Descriptions(Mutex<Vec<(&'static str, String, Option<Unit>, String)>>);

impl Recorder for Descriptions {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, d: SharedString) {
        self.0
            .lock()
            .unwrap()
            .push(("counter", key.as_str().to_owned(), unit, d.to_string()));
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, d: SharedString) {
        self.0
            .lock()
            .unwrap()
            .push(("gauge", key.as_str().to_owned(), unit, d.to_string()));
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, d: SharedString) {
        self.0
            .lock()
            .unwrap()
            .push(("histogram", key.as_str().to_owned(), unit, d.to_string()));
    }
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// The table of docs/guides/metrics.md:105-128: name and type.
const TABLE: &[(&str, &str)] = &[
    ("sturdy.retry.retries", "counter"),
    ("sturdy.retry.delay", "histogram"),
    ("sturdy.retry.stopped", "counter"),
    ("sturdy.ratelimit.waits", "counter"),
    ("sturdy.ratelimit.wait.duration", "histogram"),
    ("sturdy.ratelimit.refusals", "counter"),
    ("sturdy.ratelimit.pauses", "counter"),
    ("sturdy.ratelimit.pause.duration", "histogram"),
    ("sturdy.circuit.transitions", "counter"),
    ("sturdy.circuit.open", "gauge"),
    ("sturdy.circuit.rejections", "counter"),
    ("sturdy.auth.token.fetches", "counter"),
    ("sturdy.auth.token.failures", "counter"),
    ("sturdy.auth.token.rejections", "counter"),
    ("sturdy.idempotency.replays", "counter"),
    ("sturdy.idempotency.refusals", "counter"),
    ("sturdy.webhook.deliveries", "counter"),
    ("sturdy.hedge.sent", "counter"),
    ("sturdy.hedge.won", "counter"),
    ("sturdy.concurrency.limit", "gauge"),
    ("sturdy.concurrency.rejections", "counter"),
    ("sturdy.coalesce.coalesced", "counter"),
];

/// metrics.md:100-103: `describe_metrics()` registers "each metric's description and its
/// `metrics` unit (`Unit::Seconds` for the histograms, `Unit::Count` for the rest)"; the table
/// is every metric there is.
#[test]
fn describe_metrics_registers_every_metric_of_the_table_with_its_unit() {
    let rec = Descriptions::default();
    metrics::with_local_recorder(&rec, describe_metrics);
    let got = rec.0.lock().unwrap().clone();
    let mut by_name = BTreeMap::new();
    for (kind, name, unit, desc) in &got {
        assert!(!desc.is_empty(), "{name} has no description");
        by_name.insert(name.clone(), (*kind, *unit));
    }
    for (name, kind) in TABLE {
        let (k, unit) = by_name
            .get(*name)
            .unwrap_or_else(|| panic!("{name} not described"));
        assert_eq!(k, kind, "{name}");
        let want = if *kind == "histogram" {
            Unit::Seconds
        } else {
            Unit::Count
        };
        assert_eq!(unit.as_ref(), Some(&want), "{name}");
    }
    let table: Vec<&str> = TABLE.iter().map(|(n, _)| *n).collect();
    for name in by_name.keys() {
        assert!(
            table.contains(&name.as_str()),
            "{name} is described but not in the guide's table"
        );
    }
}

/// One metric as recorded: name, kind, labels, value.
#[derive(Debug)]
struct M {
    name: String,
    kind: MetricKind,
    labels: BTreeMap<String, String>,
    value: DebugValue,
}

fn take(snap: &Snapshotter) -> Vec<M> {
    snap.snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _, _, value)| {
            let (kind, key) = ck.into_parts();
            M {
                name: key.name().to_owned(),
                kind,
                labels: key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect(),
                value,
            }
        })
        // The recorder keeps metrics seen before with a zero count: only what this step did.
        .filter(|m| match &m.value {
            DebugValue::Counter(n) => *n > 0,
            DebugValue::Histogram(v) => !v.is_empty(),
            DebugValue::Gauge(_) => true,
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn counter(ms: &[M], name: &str, want: &BTreeMap<String, String>) -> u64 {
    ms.iter()
        .filter(|m| m.name == name && &m.labels == want)
        .map(|m| match m.value {
            DebugValue::Counter(n) => n,
            ref v => panic!("{name} is not a counter: {v:?}"),
        })
        .sum()
}

fn named<'a>(ms: &'a [M], name: &str) -> Vec<&'a M> {
    ms.iter().filter(|m| m.name == name).collect()
}

/// An API whose n-th call (from 0) answers `script(n)`: status and optional Retry-After.
#[derive(Clone)]
struct Api {
    calls: Arc<AtomicUsize>,
    script: Arc<dyn Fn(usize) -> (u16, Option<&'static str>) + Send + Sync>,
}

impl Api {
    fn new(script: impl Fn(usize) -> (u16, Option<&'static str>) + Send + Sync + 'static) -> Self {
        Self {
            calls: Arc::default(),
            script: Arc::new(script),
        }
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
    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let (status, ra) = (self.script)(n);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let mut b = Response::builder().status(status);
            if let Some(ra) = ra {
                b = b.header("retry-after", ra);
            }
            Ok(b.body(Full::default()).unwrap())
        })
    }
}

fn quick() -> RetryLayer {
    RetryLayer::new().with_seed(5).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(10), Duration::from_millis(50)).unwrap(),
    )
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

/// metrics.md:107-109 and :132-145: the retry layer's metrics and their labels: host and port
/// split from the authority (no `server.port` without one, never the user info), the method
/// (`_OTHER` past the nine standard ones), `error.type` (the status code; `rate_limited` for a
/// 429), the delay's source, and the stop reasons.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_retry_metrics_carry_the_guides_labels() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    // 503 then 200, to a host with a port and user info.
    let api = Api::new(|n| if n == 0 { (503, None) } else { (200, None) });
    let svc = quick().layer(api);
    let res = svc
        .oneshot(get("http://user:pa55word@api.example.com:8443/o?q=1"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let ms = take(&snap);
    let want = labels(&[
        ("server.address", "api.example.com"),
        ("server.port", "8443"),
        ("http.request.method", "GET"),
        ("error.type", "503"),
    ]);
    assert_eq!(counter(&ms, "sturdy.retry.retries", &want), 1, "{ms:#?}");
    let delay = named(&ms, "sturdy.retry.delay");
    assert_eq!(delay.len(), 1, "{ms:#?}");
    assert_eq!(delay[0].kind, MetricKind::Histogram);
    assert_eq!(
        delay[0].labels,
        labels(&[
            ("server.address", "api.example.com"),
            ("server.port", "8443"),
            ("http.request.method", "GET"),
            ("sturdy.delay.source", "backoff"),
        ])
    );
    for m in &ms {
        for v in m.labels.values() {
            assert!(
                !v.contains("pa55word") && !v.contains('/') && !v.contains('?'),
                "{m:?}"
            );
        }
    }

    // A 429 with a short Retry-After, to a host without a port: `rate_limited`, from `retry_after`.
    let api = Api::new(|n| {
        if n == 0 {
            (429, Some("1"))
        } else {
            (200, None)
        }
    });
    let svc = quick().layer(api);
    svc.oneshot(get("http://api.example.com/cache"))
        .await
        .unwrap();
    let ms = take(&snap);
    let want = labels(&[
        ("server.address", "api.example.com"),
        ("http.request.method", "GET"),
        ("error.type", "rate_limited"),
    ]);
    assert_eq!(counter(&ms, "sturdy.retry.retries", &want), 1, "{ms:#?}");
    let delay = named(&ms, "sturdy.retry.delay");
    assert_eq!(
        delay[0]
            .labels
            .get("sturdy.delay.source")
            .map(String::as_str),
        Some("retry_after")
    );
    assert!(
        !delay[0].labels.contains_key("server.port"),
        "{:?}",
        delay[0]
    );

    // A method outside the nine standard ones is `_OTHER` (and, not known to be idempotent, it is
    // not retried).
    let svc = quick().layer(Api::new(|_| (503, None)));
    let req = Request::builder()
        .method(Method::from_bytes(b"PURGE").unwrap())
        .uri("http://api.example.com/cache")
        .body(Full::default())
        .unwrap();
    let _ = svc.oneshot(req).await.unwrap();
    let ms = take(&snap);
    assert!(
        ms.iter()
            .all(|m| m.labels.get("http.request.method").map(String::as_str) == Some("_OTHER")),
        "{ms:#?}"
    );

    // Stop reasons.
    let cases: Vec<(
        RetryLayer,
        Request<Full<Bytes>>,
        (u16, Option<&'static str>),
        &str,
        &str,
    )> = vec![
        (
            quick(),
            get("http://api.example.com/a"),
            (503, None),
            "attempts_exhausted",
            "503",
        ),
        (
            quick(),
            Request::post("http://api.example.com/a")
                .body(Full::from("x"))
                .unwrap(),
            (503, None),
            "not_idempotent",
            "503",
        ),
        (
            quick(),
            get("http://api.example.com/a"),
            (429, Some("120")),
            "wait_too_long",
            "rate_limited",
        ),
        (
            RetryLayer::new().with_deadline(Duration::from_millis(100)),
            get("http://api.example.com/a"),
            (503, None),
            "past_deadline",
            "503",
        ),
        (
            quick().with_body_limit(4),
            Request::put("http://api.example.com/a")
                .body(Full::from("0123456789"))
                .unwrap(),
            (503, None),
            "not_replayable",
            "503",
        ),
    ];
    for (layer, req, answer, reason, etype) in cases {
        let method = req.method().as_str().to_owned();
        let svc = layer.layer(Api::new(move |_| answer));
        let _ = svc.oneshot(req).await;
        let ms = take(&snap);
        let want = labels(&[
            ("server.address", "api.example.com"),
            ("http.request.method", &method),
            ("error.type", etype),
            ("sturdy.retry.stop_reason", reason),
        ]);
        assert_eq!(
            counter(&ms, "sturdy.retry.stopped", &want),
            1,
            "{reason}: {ms:#?}"
        );
    }
}

/// metrics.md:83-86: "a call that goes straight through the client stack (admitted by the
/// breaker, a free rate slot, a 2xx on the first attempt) emits nothing".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_plain_call_through_the_client_emits_nothing() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let events = Arc::new(AtomicUsize::new(0));
    let e = |c: &Arc<AtomicUsize>| {
        let c = c.clone();
        move |_: &Event<'_>| {
            c.fetch_add(1, Ordering::SeqCst);
        }
    };
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().on_event(e(&events)))
        .with_circuit_breaker(CircuitBreakerLayer::new().on_event(e(&events)))
        .with_rate_limit(
            RateLimitLayer::new(Quota::per_second(1000).unwrap().with_burst(100).unwrap())
                .on_event(e(&events)),
        )
        .build(Api::new(|_| (200, None)));
    for i in 0..5 {
        let res = client
            .clone()
            .oneshot(
                Request::post(format!("http://api.example.com/o/{i}"))
                    .body(Full::from("x"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(events.load(Ordering::SeqCst), 0);
    let ms = take(&snap);
    assert!(ms.is_empty(), "{ms:#?}");
}

/// metrics.md:79: "a layer with a callback still records metrics"; :156: "Setting it again
/// replaces the callback."
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_second_callback_replaces_the_first_and_the_recorder_still_counts() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let first = Arc::new(AtomicUsize::new(0));
    let second = Arc::new(AtomicUsize::new(0));
    let (f, s) = (first.clone(), second.clone());
    let layer = quick()
        .on_event(move |_| {
            f.fetch_add(1, Ordering::SeqCst);
        })
        .on_event(move |_| {
            s.fetch_add(1, Ordering::SeqCst);
        });
    let svc = layer.layer(Api::new(|n| if n == 0 { (503, None) } else { (200, None) }));
    svc.oneshot(get("http://api.example.com/a")).await.unwrap();
    assert_eq!(first.load(Ordering::SeqCst), 0);
    assert_eq!(second.load(Ordering::SeqCst), 1);
    assert_eq!(named(&take(&snap), "sturdy.retry.retries").len(), 1);
}

/// metrics.md:113-117 and :135-138: rate-limit pauses (source, status) and circuit transitions,
/// the open gauge and rejections, labelled by host; after `with_key(..)` no `server.*` label at
/// all and the event's `host` is `None`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn pauses_and_breaker_metrics_by_host_and_none_with_a_custom_key() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    // A 429 with Retry-After pauses the host.
    let svc = RateLimitLayer::adaptive_only().layer(Api::new(|_| (429, Some("2"))));
    let res = svc
        .oneshot(get("http://api.example.com:9000/a"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let ms = take(&snap);
    let want = labels(&[
        ("server.address", "api.example.com"),
        ("server.port", "9000"),
        ("sturdy.pause.source", "retry_after"),
        ("http.response.status_code", "429"),
    ]);
    assert_eq!(counter(&ms, "sturdy.ratelimit.pauses", &want), 1, "{ms:#?}");
    let pd = named(&ms, "sturdy.ratelimit.pause.duration");
    assert_eq!(pd.len(), 1);
    assert_eq!(
        pd[0].labels,
        labels(&[
            ("server.address", "api.example.com"),
            ("server.port", "9000")
        ])
    );

    // A breaker that opens on a streak, then refuses.
    let layer = CircuitBreakerLayer::new().with_consecutive_failures(2);
    let (layer, handle) = layer.pair();
    let svc = layer.layer(Api::new(|_| (503, None)));
    for _ in 0..2 {
        let _ = svc.clone().oneshot(get("http://api.example.com/a")).await;
    }
    let err = svc
        .clone()
        .oneshot(get("http://api.example.com/a"))
        .await
        .unwrap_err();
    assert!(err.is::<sturdy::core::CircuitOpen>());
    let ms = take(&snap);
    let host = labels(&[("server.address", "api.example.com")]);
    let mut opened = host.clone();
    opened.insert("sturdy.circuit.state".into(), "open".into());
    assert_eq!(
        counter(&ms, "sturdy.circuit.transitions", &opened),
        1,
        "{ms:#?}"
    );
    assert_eq!(
        counter(&ms, "sturdy.circuit.rejections", &host),
        1,
        "{ms:#?}"
    );
    let gauge = named(&ms, "sturdy.circuit.open");
    assert_eq!(gauge.len(), 1, "{ms:#?}");
    assert_eq!(gauge[0].labels, host);
    assert!(
        matches!(gauge[0].value, DebugValue::Gauge(v) if v.into_inner() == 1.0),
        "{:?}",
        gauge[0]
    );
    handle.force_close("api.example.com");
    let ms = take(&snap);
    let gauge = named(&ms, "sturdy.circuit.open");
    assert!(
        matches!(gauge[0].value, DebugValue::Gauge(v) if v.into_inner() == 0.0),
        "{gauge:?}"
    );

    // The same with a custom key: no server.* labels, host None in the event.
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g2 = metrics::set_default_local_recorder(&rec);
    let hosts = Arc::new(Mutex::new(Vec::new()));
    let h = hosts.clone();
    let layer = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .on_event(move |e| {
            if let Event::CircuitChanged { host, key, .. } = e {
                h.lock()
                    .unwrap()
                    .push((host.map(str::to_owned), (*key).to_owned()));
            }
        })
        .with_key(|_req: &Request<Full<Bytes>>| "tenant-a".to_owned());
    let svc = layer.layer(Api::new(|_| (503, None)));
    for _ in 0..3 {
        let _ = svc.clone().oneshot(get("http://api.example.com/a")).await;
    }
    let ms = take(&snap);
    assert!(
        !named(&ms, "sturdy.circuit.transitions").is_empty(),
        "{ms:#?}"
    );
    for m in ms.iter().filter(|m| m.name.starts_with("sturdy.circuit.")) {
        assert!(!m.labels.keys().any(|k| k.starts_with("server.")), "{m:?}");
        assert!(!m.labels.values().any(|v| v.contains("tenant-a")), "{m:?}");
    }
    assert_eq!(
        hosts.lock().unwrap().first(),
        Some(&(None, "tenant-a".to_owned()))
    );
}

/// metrics.md:126-128 and :86-88: the adaptive limit's gauge and rejections, and coalesced
/// calls by host and method.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn concurrency_and_coalesce_metrics_by_host() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    // Limit 1, no wait: the second call in flight is refused; a 503 lowers nothing below 1.
    let layer = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(2)
        .with_max_wait(Duration::ZERO);
    let svc = layer.layer(Api::new(|_| (200, None)));
    let a = tokio::spawn(svc.clone().oneshot(get("http://api.example.com:81/a")));
    let b = tokio::spawn(svc.clone().oneshot(get("http://api.example.com:81/a")));
    tokio::task::yield_now().await;
    let err = svc
        .clone()
        .oneshot(get("http://api.example.com:81/a"))
        .await
        .unwrap_err();
    assert!(sturdy::core::find::<sturdy::concurrency::LimitReached>(&*err).is_some());
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let ms = take(&snap);
    let host = labels(&[("server.address", "api.example.com"), ("server.port", "81")]);
    assert_eq!(
        counter(&ms, "sturdy.concurrency.rejections", &host),
        1,
        "{ms:#?}"
    );
    // A success with the whole limit in use raises it from 1 to 2; a 503 lowers 20 to 18.
    let svc = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(1)
        .layer(Api::new(|_| (200, None)));
    svc.oneshot(get("http://api.example.com:81/a"))
        .await
        .unwrap();
    let ms = take(&snap);
    let g = named(&ms, "sturdy.concurrency.limit");
    assert_eq!(g.len(), 1, "{ms:#?}");
    assert_eq!(g[0].labels, host);
    assert!(
        matches!(g[0].value, DebugValue::Gauge(v) if v.into_inner() == 2.0),
        "{g:?}"
    );
    let svc = AdaptiveConcurrencyLayer::new().layer(Api::new(|_| (503, None)));
    svc.oneshot(get("http://api.example.com:82/a"))
        .await
        .unwrap();
    let ms = take(&snap);
    let g: Vec<_> = named(&ms, "sturdy.concurrency.limit")
        .into_iter()
        .filter(|m| m.labels.get("server.port").map(String::as_str) == Some("82"))
        .collect();
    assert!(
        matches!(g[0].value, DebugValue::Gauge(v) if v.into_inner() == 18.0),
        "{g:?}"
    );

    // Coalescing: 3 identical GETs, 2 join.
    let api = Api::new(|_| (200, None));
    let svc = CoalesceLayer::new().layer(api.clone());
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://api.example.com/report"))))
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(api.calls.load(Ordering::SeqCst), 1);
    let ms = take(&snap);
    let want = labels(&[
        ("server.address", "api.example.com"),
        ("http.request.method", "GET"),
    ]);
    assert_eq!(
        counter(&ms, "sturdy.coalesce.coalesced", &want),
        2,
        "{ms:#?}"
    );
}

/// metrics.md:121-123: the server idempotency layer's refusals (`error.type` `missing_key`,
/// `invalid_key`, status 400) and webhook deliveries (route, scheme, outcome, status).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn server_side_refusals_and_webhook_deliveries_carry_their_labels() {
    use sturdy::idempotency::server::{IdempotencyLayer, MemoryStore};
    use sturdy::webhook::{GitHub, MemoryQueue, WebhookReceiver};
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    let handler = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("done")))
    });
    let svc = IdempotencyLayer::new(MemoryStore::default(), |_: &http::request::Parts| {
        "c".to_owned()
    })
    .with_require_key(true)
    .layer(handler);
    let res = svc
        .clone()
        .oneshot(
            Request::post("http://me/orders")
                .body(Full::from("x"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = svc
        .clone()
        .oneshot(
            Request::post("http://me/orders")
                .header("idempotency-key", "k".repeat(256))
                .body(Full::from("x"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let ms = take(&snap);
    for reason in ["missing_key", "invalid_key"] {
        let want = labels(&[
            ("http.request.method", "POST"),
            ("http.response.status_code", "400"),
            ("error.type", reason),
        ]);
        assert_eq!(
            counter(&ms, "sturdy.idempotency.refusals", &want),
            1,
            "{reason}: {ms:#?}"
        );
    }

    let (queue, _rx) = MemoryQueue::new(8);
    let receiver = WebhookReceiver::new(GitHub::new("a webhook secret").unwrap(), queue);
    let res = receiver
        .oneshot(
            Request::post("http://me/hooks/github")
                .header("x-github-event", "push")
                .header("x-github-delivery", "d-1")
                .header("x-hub-signature-256", "sha256=00")
                .body(Full::<Bytes>::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = res.status().as_u16().to_string();
    let ms = take(&snap);
    let d = named(&ms, "sturdy.webhook.deliveries");
    assert_eq!(d.len(), 1, "{ms:#?}");
    assert_eq!(
        d[0].labels,
        labels(&[
            ("sturdy.webhook.route", "github"),
            ("sturdy.webhook.scheme", "github"),
            ("sturdy.webhook.outcome", "rejected"),
            ("http.response.status_code", &status),
        ])
    );
}

/// metrics.md:153-156: `on_event` exists on every layer the guide lists (and the version layer
/// has `on_notice`, src/lib.rs:24).
#[test]
fn every_layer_the_guide_lists_has_on_event() {
    use sturdy::auth::{AuthLayer, ClientCredentials};
    use sturdy::hedge::HedgeLayer;
    use sturdy::idempotency::server::{IdempotencyLayer, MemoryStore};
    use sturdy::webhook::{GitHub, MemoryQueue, WebhookReceiver};
    fn f(_: &Event<'_>) {}
    let _ = RetryLayer::new().on_event(f);
    let _ = RateLimitLayer::adaptive_only().on_event(f);
    let _ = CircuitBreakerLayer::new().on_event(f);
    let _ = AuthLayer::bearer("t").unwrap().on_event(f);
    let http = service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let _ = ClientCredentials::new(http, "http://auth.example.com/token", "id", "secret")
        .unwrap()
        .on_event(f);
    let _ = IdempotencyLayer::new(MemoryStore::default(), |_: &http::request::Parts| {
        String::new()
    })
    .on_event(f);
    let _ = WebhookReceiver::new(GitHub::new("s").unwrap(), MemoryQueue::new(1).0).on_event(f);
    let _ = HedgeLayer::new().on_event(f);
    let _ = AdaptiveConcurrencyLayer::new().on_event(f);
    let _ = CoalesceLayer::new().on_event(f);
    let _ = sturdy::version::VersionLayer::query("v", "1").on_notice(|_| {});
}

/// metrics.md:126: "`sturdy.concurrency.limit` | gauge | ... | the adaptive limit of a host, as
/// last changed", and the event "the number of calls a key may have in flight changed"
/// (`ConcurrencyLimitChanged`). concurrency.md:45: "A handle sets a host's limit by hand
/// (`handle.set_limit(host, n)`)". A limit set by hand is a change the gauge should show.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_limit_set_by_hand_reaches_the_gauge_and_the_callback() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let changes = Arc::new(Mutex::new(Vec::new()));
    let c = changes.clone();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .on_event(move |e| {
            if let Event::ConcurrencyLimitChanged { from, to, .. } = e {
                c.lock().unwrap().push((*from, *to));
            }
        })
        .pair();
    let svc = layer.layer(Api::new(|n| if n == 0 { (503, None) } else { (200, None) }));
    svc.clone()
        .oneshot(get("http://api.example.com/a"))
        .await
        .unwrap();
    assert_eq!(changes.lock().unwrap().clone(), vec![(20, 18)]);
    handle.set_limit("api.example.com", 7);
    assert_eq!(handle.limit("api.example.com"), Some(7));
    svc.clone()
        .oneshot(get("http://api.example.com/a"))
        .await
        .unwrap();
    assert_eq!(handle.limit("api.example.com"), Some(7));
    let ms = take(&snap);
    let g = named(&ms, "sturdy.concurrency.limit");
    assert!(
        matches!(g[0].value, DebugValue::Gauge(v) if v.into_inner() == 7.0),
        "{g:?}"
    );
    assert_eq!(changes.lock().unwrap().last(), Some(&(18, 7)));
}
