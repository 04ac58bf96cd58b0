#![cfg(feature = "full")]
//! s51b: the `metrics` feature against docs/guides/metrics.md, with `metrics-util`'s
//! `DebuggingRecorder` installed for one current-thread test: each event is counted under the
//! name, labels and unit the guide's table gives (over the wire through `SturdyMiddleware`, and
//! on paused time over in-process services); no metric or label the table does not list; label
//! values bounded for many hosts and paths, and free of secrets, paths and queries.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use metrics::Unit;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::CallOptions;
use sturdy::ratelimit::RateLimitLayer;
use sturdy::reqwest::SturdyMiddleware;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tower::{service_fn, Layer, Service, ServiceExt};

#[derive(Debug)]
struct Row {
    name: String,
    labels: BTreeMap<String, String>,
    unit: Option<Unit>,
    value: DebugValue,
}

fn rows(s: &Snapshotter) -> Vec<Row> {
    s.snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, unit, _desc, value)| {
            let (_kind, key) = ck.into_parts();
            Row {
                name: key.name().to_owned(),
                labels: key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect(),
                unit,
                value,
            }
        })
        .collect()
}

/// The guide's table: each metric and its label names.
fn table() -> BTreeMap<&'static str, &'static [&'static str]> {
    const HOST: &[&str] = &["server.address", "server.port"];
    let mut t: BTreeMap<&'static str, &'static [&'static str]> = BTreeMap::new();
    t.insert(
        "sturdy.retry.retries",
        &[
            "server.address",
            "server.port",
            "http.request.method",
            "error.type",
        ],
    );
    t.insert(
        "sturdy.retry.delay",
        &[
            "server.address",
            "server.port",
            "http.request.method",
            "sturdy.delay.source",
        ],
    );
    t.insert(
        "sturdy.retry.stopped",
        &[
            "server.address",
            "server.port",
            "http.request.method",
            "error.type",
            "sturdy.retry.stop_reason",
        ],
    );
    t.insert("sturdy.ratelimit.waits", HOST);
    t.insert("sturdy.ratelimit.wait.duration", HOST);
    t.insert("sturdy.ratelimit.refusals", HOST);
    t.insert(
        "sturdy.ratelimit.pauses",
        &[
            "server.address",
            "server.port",
            "sturdy.pause.source",
            "http.response.status_code",
        ],
    );
    t.insert("sturdy.ratelimit.pause.duration", HOST);
    t.insert(
        "sturdy.circuit.transitions",
        &["server.address", "server.port", "sturdy.circuit.state"],
    );
    t.insert("sturdy.circuit.open", HOST);
    t.insert("sturdy.circuit.rejections", HOST);
    t.insert("sturdy.auth.token.fetches", HOST);
    t.insert(
        "sturdy.auth.token.failures",
        &["server.address", "server.port", "error.type"],
    );
    t.insert("sturdy.auth.token.rejections", HOST);
    t.insert("sturdy.idempotency.replays", &["http.request.method"]);
    t.insert(
        "sturdy.idempotency.refusals",
        &[
            "http.request.method",
            "http.response.status_code",
            "error.type",
        ],
    );
    t.insert(
        "sturdy.webhook.deliveries",
        &[
            "sturdy.webhook.route",
            "sturdy.webhook.scheme",
            "sturdy.webhook.outcome",
            "http.response.status_code",
        ],
    );
    t.insert("sturdy.hedge.sent", HOST);
    t.insert("sturdy.hedge.won", HOST);
    t.insert("sturdy.concurrency.limit", HOST);
    t.insert("sturdy.concurrency.rejections", HOST);
    t.insert(
        "sturdy.coalesce.coalesced",
        &["server.address", "server.port", "http.request.method"],
    );
    t
}

const HISTOGRAMS: &[&str] = &[
    "sturdy.retry.delay",
    "sturdy.ratelimit.wait.duration",
    "sturdy.ratelimit.pause.duration",
];

/// Every row is a metric of the table, with only the table's labels, and no value carries
/// any of `secrets` (nor a `/` or `?`: "never a path or a query").
fn check_listed(rs: &[Row], secrets: &[&str]) {
    let t = table();
    for r in rs {
        let allowed = t
            .get(r.name.as_str())
            .unwrap_or_else(|| panic!("a metric the guide does not list: {r:?}"));
        // "`Unit::Seconds` for the histograms, `Unit::Count` for the rest".
        let unit = if HISTOGRAMS.contains(&r.name.as_str()) {
            Unit::Seconds
        } else {
            Unit::Count
        };
        assert_eq!(r.unit, Some(unit), "{r:?}");
        for (k, v) in &r.labels {
            assert!(
                allowed.contains(&k.as_str()),
                "label {k} not listed for {r:?}"
            );
            assert!(
                !v.contains('/') && !v.contains('?'),
                "a path or query in {r:?}"
            );
            for s in secrets {
                assert!(!v.contains(s), "{s} in {r:?}");
            }
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn counter(rs: &[Row], name: &str, want: &[(&str, &str)]) -> u64 {
    let want = labels(want);
    rs.iter()
        .filter(|r| r.name == name && r.labels == want)
        .map(|r| match r.value {
            DebugValue::Counter(n) => n,
            _ => panic!("not a counter: {r:?}"),
        })
        .sum()
}

fn gauge(rs: &[Row], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let want = labels(want);
    rs.iter()
        .find(|r| r.name == name && r.labels == want)
        .map(|r| match &r.value {
            DebugValue::Gauge(g) => g.into_inner(),
            _ => panic!("not a gauge: {r:?}"),
        })
}

fn histogram(rs: &[Row], name: &str, want: &[(&str, &str)]) -> Vec<f64> {
    let want = labels(want);
    rs.iter()
        .filter(|r| r.name == name && r.labels == want)
        .flat_map(|r| match &r.value {
            DebugValue::Histogram(h) => h.iter().map(|x| x.into_inner()).collect::<Vec<_>>(),
            _ => panic!("not a histogram: {r:?}"),
        })
        .collect()
}

fn names(rs: &[Row]) -> BTreeSet<String> {
    rs.iter().map(|r| r.name.clone()).collect()
}

fn req(method: &str, uri: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::default())
        .unwrap()
}

fn resp(code: u16, retry_after: Option<&'static str>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::default());
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    if let Some(v) = retry_after {
        r.headers_mut()
            .insert("retry-after", http::HeaderValue::from_static(v));
    }
    r
}

/// An in-process API answering `script` in turn (the last one afterwards).
fn api(
    script: Vec<(u16, Option<&'static str>)>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    let calls = Arc::new(AtomicU32::new(0));
    let script = Arc::new(script);
    service_fn(move |_req: Request<Full<Bytes>>| {
        let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
        let (code, ra) = *script.get(n).or(script.last()).unwrap();
        async move { Ok::<_, Infallible>(resp(code, ra)) }
    })
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::exponential(Duration::from_millis(10), Duration::from_millis(10)).unwrap(),
        )
        .with_seed(51)
}

/// A hyper server answering `script` in turn.
async fn serve(script: Vec<(u16, Option<&'static str>)>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let calls = calls.clone();
            let script = script.clone();
            let svc = hyper::service::service_fn(move |_req| {
                let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
                let (code, ra) = *script.get(n).or(script.last()).unwrap();
                async move { Ok::<_, Infallible>(resp(code, ra)) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

/// Over the wire through reqwest: a 503 then a 200 is one `sturdy.retry.retries` with the
/// host and port of the URL, the method and `error.type` "503", and one `sturdy.retry.delay`
/// of source `backoff`; no credentials, path or query anywhere; units as `describe_metrics`
/// registers them ("`Unit::Seconds` for the histograms, `Unit::Count` for the rest").
#[tokio::test(flavor = "current_thread")]
async fn s51b_metrics_reqwest_retry_labels_and_units() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let addr = serve(vec![(503, None), (200, None)]).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .build();
    let port = addr.port().to_string();
    let res = client
        .get(format!(
            "http://user:pw0rd@127.0.0.1:{port}/orders/o_17?api_key=SECRETKEY"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rs = rows(&snap);
    check_listed(&rs, &["pw0rd", "user", "SECRETKEY", "o_17", "orders"]);
    assert_eq!(
        names(&rs),
        BTreeSet::from([
            "sturdy.retry.retries".to_owned(),
            "sturdy.retry.delay".to_owned()
        ]),
        "{rs:#?}"
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.retries",
            &[
                ("server.address", "127.0.0.1"),
                ("server.port", &port),
                ("http.request.method", "GET"),
                ("error.type", "503"),
            ]
        ),
        1,
        "{rs:#?}"
    );
    let delays = histogram(
        &rs,
        "sturdy.retry.delay",
        &[
            ("server.address", "127.0.0.1"),
            ("server.port", &port),
            ("http.request.method", "GET"),
            ("sturdy.delay.source", "backoff"),
        ],
    );
    assert_eq!(delays.len(), 1, "{rs:#?}");
    assert!((delays[0] - 0.010).abs() < 1e-6, "{delays:?} (seconds)");
    for r in &rs {
        let want = if HISTOGRAMS.contains(&r.name.as_str()) {
            Unit::Seconds
        } else {
            Unit::Count
        };
        assert_eq!(r.unit, Some(want), "{r:?}");
    }
}

/// Over the wire: a reqwest timeout and a refused connection are `error.type` `timeout` and
/// `connect`; attempts exhausted is `sturdy.retry.stopped` with `attempts_exhausted`.
#[tokio::test(flavor = "current_thread")]
async fn s51b_metrics_reqwest_timeout_and_connect_error_types() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    // A server that never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_retry(quick_retry().with_max_attempts(2))
                .build(next)
        }))
        .build();
    client
        .get(format!("http://{slow}/x"))
        .timeout(Duration::from_millis(50))
        .send()
        .await
        .unwrap_err();
    client
        .get(format!("http://127.0.0.1:{closed}/x"))
        .send()
        .await
        .unwrap_err();
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    let sp = slow.port().to_string();
    let cp = closed.to_string();
    for (port, ty) in [(&sp, "timeout"), (&cp, "connect")] {
        assert_eq!(
            counter(
                &rs,
                "sturdy.retry.retries",
                &[
                    ("server.address", "127.0.0.1"),
                    ("server.port", port),
                    ("http.request.method", "GET"),
                    ("error.type", ty),
                ]
            ),
            1,
            "{ty}: {rs:#?}"
        );
        assert_eq!(
            counter(
                &rs,
                "sturdy.retry.stopped",
                &[
                    ("server.address", "127.0.0.1"),
                    ("server.port", port),
                    ("http.request.method", "GET"),
                    ("error.type", ty),
                    ("sturdy.retry.stop_reason", "attempts_exhausted"),
                ]
            ),
            1,
            "{ty}: {rs:#?}"
        );
    }
}

/// metrics.md: a 429 with `Retry-After` is a pause (`sturdy.pause.source` `retry_after`,
/// `http.response.status_code` 429) of the applied length, and the retry after it waits with
/// source `retry_after` and counts `error.type` `rate_limited`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_429_pause_and_retry_after() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(api(vec![(429, Some("2")), (200, None)]));
    let res = client
        .oneshot(req("GET", "http://api.example.com:8443/v1/things?key=abc"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rs = rows(&snap);
    check_listed(&rs, &["abc", "things"]);
    let host = [
        ("server.address", "api.example.com"),
        ("server.port", "8443"),
    ];
    assert_eq!(
        counter(
            &rs,
            "sturdy.ratelimit.pauses",
            &[
                host[0],
                host[1],
                ("sturdy.pause.source", "retry_after"),
                ("http.response.status_code", "429"),
            ]
        ),
        1,
        "{rs:#?}"
    );
    assert_eq!(
        histogram(&rs, "sturdy.ratelimit.pause.duration", &host),
        [2.0],
        "{rs:#?}"
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.retries",
            &[
                host[0],
                host[1],
                ("http.request.method", "GET"),
                ("error.type", "rate_limited"),
            ]
        ),
        1,
        "{rs:#?}"
    );
    let d = histogram(
        &rs,
        "sturdy.retry.delay",
        &[
            host[0],
            host[1],
            ("http.request.method", "GET"),
            ("sturdy.delay.source", "retry_after"),
        ],
    );
    assert_eq!(d.len(), 1, "{rs:#?}");
    assert!(d[0] >= 2.0 && d[0] < 2.5, "{d:?}");
}

/// metrics.md: `sturdy.retry.stopped` reasons `not_idempotent` (a POST without a key that
/// may have reached the server) and `wait_too_long` (a `Retry-After` longer than the layer
/// waits); `http.request.method` is `_OTHER` for a method outside the nine standard ones.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_stop_reasons_and_other_methods() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let host = [("server.address", "api.example.com")];
    // POST without a key: not retried.
    let client = ClientBuilder::new()
        .without_idempotency()
        .with_retry(quick_retry())
        .build(api(vec![(503, None)]));
    let res = client
        .oneshot(req("POST", "http://api.example.com/orders"))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    // A Retry-After of 2 min (the layer waits at most 60 s).
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(api(vec![(503, Some("120"))]));
    let _ = client
        .oneshot(req("GET", "http://api.example.com/orders"))
        .await;
    // A method outside the nine: PURGE with a key of its own is retried like any keyed call.
    let client = RetryLayer::new()
        .with_backoff(
            Backoff::exponential(Duration::from_millis(10), Duration::from_millis(10)).unwrap(),
        )
        .layer(api(vec![(503, None), (200, None)]));
    let mut r = req("PURGE", "http://api.example.com/cache");
    r.headers_mut()
        .insert("idempotency-key", http::HeaderValue::from_static("k-1"));
    let _ = client.oneshot(r).await.unwrap();
    let rs = rows(&snap);
    check_listed(&rs, &["k-1"]);
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.stopped",
            &[
                host[0],
                ("http.request.method", "POST"),
                ("error.type", "503"),
                ("sturdy.retry.stop_reason", "not_idempotent"),
            ]
        ),
        1,
        "{rs:#?}"
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.stopped",
            &[
                host[0],
                ("http.request.method", "GET"),
                ("error.type", "503"),
                ("sturdy.retry.stop_reason", "wait_too_long"),
            ]
        ),
        1,
        "{rs:#?}"
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.retries",
            &[
                host[0],
                ("http.request.method", "_OTHER"),
                ("error.type", "503"),
            ]
        ),
        1,
        "{rs:#?}"
    );
}

/// metrics.md: `sturdy.circuit.transitions` (the state entered), `sturdy.circuit.open` (1
/// while the breaker refuses calls, 0 otherwise) and `sturdy.circuit.rejections`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_breaker_transitions_gauge_and_rejections() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let svc = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_open_duration(Duration::from_secs(10), Duration::from_secs(10))
        .layer(api(vec![(500, None), (500, None), (200, None)]));
    let uri = "http://api.example.com:8443/orders";
    for _ in 0..2 {
        let res = svc.clone().oneshot(req("GET", uri)).await.unwrap();
        assert_eq!(res.status(), 500);
    }
    for _ in 0..3 {
        svc.clone().oneshot(req("GET", uri)).await.unwrap_err();
    }
    let host = [
        ("server.address", "api.example.com"),
        ("server.port", "8443"),
    ];
    // (The debugging recorder's snapshot drains counters: each snapshot counts what came after
    // the one before.)
    let rs = rows(&snap);
    assert_eq!(
        gauge(&rs, "sturdy.circuit.open", &host),
        Some(1.0),
        "{rs:#?}"
    );
    assert_eq!(
        counter(&rs, "sturdy.circuit.rejections", &host),
        3,
        "{rs:#?}"
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.circuit.transitions",
            &[host[0], host[1], ("sturdy.circuit.state", "open")]
        ),
        1,
        "{rs:#?}"
    );
    check_listed(&rs, &[]);
    tokio::time::advance(Duration::from_secs(11)).await;
    let res = svc.clone().oneshot(req("GET", uri)).await.unwrap();
    assert_eq!(res.status(), 200);
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    assert_eq!(
        gauge(&rs, "sturdy.circuit.open", &host),
        Some(0.0),
        "{rs:#?}"
    );
    for state in ["half_open", "closed"] {
        assert_eq!(
            counter(
                &rs,
                "sturdy.circuit.transitions",
                &[host[0], host[1], ("sturdy.circuit.state", state)]
            ),
            1,
            "{state}: {rs:#?}"
        );
    }
}

/// metrics.md, Labels: past a layer's bound on kept keys, "the events of that state (a pause,
/// a breaker's transition, ...) carry `server.address` `*` and no `server.port`"; "Cardinality
/// stays bounded". 40 hosts, each answered 429 with `Retry-After`, under `with_max_keys(4)`; 40
/// hosts failing under `with_max_breakers(4)`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_overflow_state_is_labelled_star_without_port() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let rl = RateLimitLayer::adaptive_only()
        .with_max_keys(4)
        .layer(api(vec![(429, Some("1"))]));
    let cb = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_max_breakers(4)
        .layer(api(vec![(500, None)]));
    for i in 0..40 {
        let uri = format!("http://h{i}.example.com:9000/p/{i}?q={i}");
        let _ = rl.clone().oneshot(req("GET", &uri)).await;
        let _ = cb.clone().oneshot(req("GET", &uri)).await;
    }
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    for name in ["sturdy.ratelimit.pauses", "sturdy.circuit.transitions"] {
        let addrs: BTreeSet<&str> = rs
            .iter()
            .filter(|r| r.name == name)
            .map(|r| r.labels["server.address"].as_str())
            .collect();
        assert!(addrs.contains("*"), "{name}: {addrs:?}");
        // The first four hosts have states of their own; the fifth arrived while all four
        // were paused (or open): it is past the bound, counted under `*`.
        for i in 0..4 {
            assert!(
                addrs.contains(format!("h{i}.example.com").as_str()),
                "{name}: {addrs:?}"
            );
        }
        assert!(!addrs.contains("h4.example.com"), "{name}: {addrs:?}");
        // Open breakers are not forgotten: the breakers' labels stay within the bound.
        if name == "sturdy.circuit.transitions" {
            assert!(addrs.len() <= 5, "{name}: {addrs:?}");
        }
        for r in rs.iter().filter(|r| r.name == name) {
            if r.labels["server.address"] == "*" {
                assert!(!r.labels.contains_key("server.port"), "{r:?}");
            } else {
                assert_eq!(r.labels["server.port"], "9000", "{r:?}");
            }
        }
    }
    for r in rs.iter().filter(|r| r.name == "sturdy.circuit.rejections") {
        assert_eq!(r.labels["server.address"], "*", "{r:?}");
        assert!(!r.labels.contains_key("server.port"), "{r:?}");
    }
}

/// metrics.md: "After `with_key(..)` their keys may be anything (a tenant, a token), so their
/// metrics carry no `server.*` labels at all".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_custom_keys_carry_no_server_labels() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let rl = RateLimitLayer::adaptive_only()
        .with_key(|r: &Request<Full<Bytes>>| {
            r.headers()
                .get("x-tenant")
                .map(|v| v.to_str().unwrap_or("").to_owned())
                .unwrap_or_default()
        })
        .layer(api(vec![(429, Some("1"))]));
    let mut r = req("GET", "http://api.example.com:8443/x");
    r.headers_mut().insert(
        "x-tenant",
        http::HeaderValue::from_static("tenant-secret-42"),
    );
    let _ = rl.oneshot(r).await;
    let rs = rows(&snap);
    check_listed(&rs, &["tenant-secret-42"]);
    let pauses: Vec<&Row> = rs
        .iter()
        .filter(|r| r.name == "sturdy.ratelimit.pauses")
        .collect();
    assert_eq!(pauses.len(), 1, "{rs:#?}");
    assert_eq!(
        pauses[0].labels,
        labels(&[
            ("sturdy.pause.source", "retry_after"),
            ("http.response.status_code", "429")
        ])
    );
    for r in &rs {
        assert!(!r.labels.contains_key("server.address"), "{r:?}");
    }
}

/// metrics.md: `sturdy.coalesce.coalesced` counts "calls that shared an identical call in
/// flight instead of sending their own", labelled by host, port and method; hostile paths do
/// not grow the label sets.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_coalesced_calls_are_counted_by_host_and_method() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let upstream = Arc::new(AtomicU32::new(0));
    let u2 = upstream.clone();
    let slow = service_fn(move |_req: Request<Full<Bytes>>| {
        u2.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let svc = CoalesceLayer::new().layer(slow);
    let mut calls = Vec::new();
    for path in ["/a?secret=1", "/b?secret=2"] {
        for _ in 0..5 {
            let s = svc.clone();
            let uri = format!("http://api.example.com:8080{path}");
            calls.push(tokio::spawn(async move {
                s.oneshot(req("GET", &uri)).await.map(|r| r.status())
            }));
        }
    }
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap(), 200);
    }
    assert_eq!(upstream.load(Ordering::SeqCst), 2);
    let rs = rows(&snap);
    check_listed(&rs, &["secret"]);
    assert_eq!(
        counter(
            &rs,
            "sturdy.coalesce.coalesced",
            &[
                ("server.address", "api.example.com"),
                ("server.port", "8080"),
                ("http.request.method", "GET"),
            ]
        ),
        8,
        "{rs:#?}"
    );
    assert_eq!(
        names(&rs),
        BTreeSet::from(["sturdy.coalesce.coalesced".to_owned()])
    );
}

/// metrics.md: `sturdy.concurrency.rejections` counts "calls refused by the adaptive limit
/// (`LimitReached`)"; `sturdy.concurrency.limit` is the limit "as last changed".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_concurrency_rejections() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let slow = service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let svc = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .with_max_wait(Duration::from_millis(10))
        .layer(slow);
    let first = tokio::spawn(svc.clone().oneshot(req("GET", "http://api.example.com/a")));
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_millis(1)).await;
    let err = svc
        .clone()
        .oneshot(req("GET", "http://api.example.com/b"))
        .await
        .unwrap_err();
    assert!(
        sturdy::core::find::<sturdy::concurrency::LimitReached>(&*err).is_some(),
        "{err}"
    );
    first.await.unwrap().unwrap();
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    assert_eq!(
        counter(
            &rs,
            "sturdy.concurrency.rejections",
            &[("server.address", "api.example.com")]
        ),
        1,
        "{rs:#?}"
    );
}

/// metrics.md: "a call that goes straight through the client stack (admitted by the breaker,
/// a free rate slot, a 2xx on the first attempt) emits nothing".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_the_plain_path_emits_nothing() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_coalesce(CoalesceLayer::new())
        .build(api(vec![(200, None)]));
    for m in ["GET", "POST", "PUT", "DELETE"] {
        let mut r = req(m, "http://api.example.com/x");
        r.extensions_mut()
            .insert(CallOptions::new().with_deadline(Duration::from_secs(5)));
        assert_eq!(client.clone().oneshot(r).await.unwrap().status(), 200);
    }
    let rs = rows(&snap);
    assert!(rs.is_empty(), "{rs:#?}");
}

/// metrics.md: server idempotency: `sturdy.idempotency.replays` (method) and
/// `sturdy.idempotency.refusals` (method, status, `error.type` `missing_key`, `invalid_key`,
/// `key_reused`); no label carries the key.
#[tokio::test(flavor = "current_thread")]
async fn s51b_metrics_server_idempotency_replays_and_refusals() {
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let app: axum::Router = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(|body: String| async move { (StatusCode::CREATED, body) }),
        )
        .layer(
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
                .with_require_key(true),
        );
    let send = |key: Option<&'static str>, body: &'static str| {
        let mut b = Request::post("/orders");
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        app.clone()
            .oneshot(b.body(axum::body::Body::from(body)).unwrap())
    };
    assert_eq!(send(Some("key-AAA"), "a").await.unwrap().status(), 201);
    assert_eq!(send(Some("key-AAA"), "a").await.unwrap().status(), 201);
    assert_eq!(send(Some("key-AAA"), "b").await.unwrap().status(), 422);
    assert_eq!(send(None, "a").await.unwrap().status(), 400);
    let long: &'static str = Box::leak("k".repeat(300).into_boxed_str());
    assert_eq!(send(Some(long), "a").await.unwrap().status(), 400);
    let rs = rows(&snap);
    check_listed(&rs, &["key-AAA", "kkkk"]);
    assert_eq!(
        counter(
            &rs,
            "sturdy.idempotency.replays",
            &[("http.request.method", "POST")]
        ),
        1,
        "{rs:#?}"
    );
    for (status, ty) in [
        ("422", "key_reused"),
        ("400", "missing_key"),
        ("400", "invalid_key"),
    ] {
        assert_eq!(
            counter(
                &rs,
                "sturdy.idempotency.refusals",
                &[
                    ("http.request.method", "POST"),
                    ("http.response.status_code", status),
                    ("error.type", ty),
                ]
            ),
            1,
            "{ty}: {rs:#?}"
        );
    }
}

/// metrics.md: `sturdy.ratelimit.waits` counts "calls that waited in line for a slot or for a
/// pause to end", with `sturdy.ratelimit.wait.duration` "the expected wait of each", and
/// `sturdy.ratelimit.refusals` "calls refused (`RateLimited`) without being sent".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_ratelimit_waits_and_refusals() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, Infallible>(if n == 0 {
                resp(429, Some("2"))
            } else {
                resp(200, None)
            })
        }
    });
    let waiting = RateLimitLayer::adaptive_only().layer(svc.clone());
    let host = [
        ("server.address", "api.example.com"),
        ("server.port", "8443"),
    ];
    let uri = "http://api.example.com:8443/x";
    assert_eq!(
        waiting
            .clone()
            .oneshot(req("GET", uri))
            .await
            .unwrap()
            .status(),
        429
    );
    let t = tokio::time::Instant::now();
    assert_eq!(
        waiting
            .clone()
            .oneshot(req("GET", uri))
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(t.elapsed() >= Duration::from_secs(2));
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    assert_eq!(counter(&rs, "sturdy.ratelimit.waits", &host), 1, "{rs:#?}");
    let w = histogram(&rs, "sturdy.ratelimit.wait.duration", &host);
    assert_eq!(w.len(), 1, "{rs:#?}");
    assert!((w[0] - 2.0).abs() < 0.01, "{w:?}");

    // A limiter that waits at most 100 ms refuses a call that would wait 2 s.
    calls.store(0, Ordering::SeqCst);
    let refusing = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_millis(100))
        .layer(svc);
    assert_eq!(
        refusing
            .clone()
            .oneshot(req("GET", uri))
            .await
            .unwrap()
            .status(),
        429
    );
    let err = refusing.clone().oneshot(req("GET", uri)).await.unwrap_err();
    assert!(
        sturdy::core::find::<sturdy::core::RateLimited>(&*err).is_some(),
        "{err}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    assert_eq!(
        counter(&rs, "sturdy.ratelimit.refusals", &host),
        1,
        "{rs:#?}"
    );
    assert_eq!(counter(&rs, "sturdy.ratelimit.waits", &host), 0, "{rs:#?}");
}

/// metrics.md: `sturdy.auth.token.fetches` (the token endpoint's host and port),
/// `sturdy.auth.token.rejections` ("401s to a cached token, each followed by a refresh and one
/// replay", the API's host and port), `sturdy.auth.token.failures` (with `error.type`); no
/// label carries the token, the client secret or a path.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_auth_token_events() {
    use sturdy::auth::{AuthLayer, ClientCredentials};
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let api_calls = Arc::new(AtomicU32::new(0));
    let token_fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (a2, f2) = (api_calls.clone(), token_fail.clone());
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        let is_token = req.uri().path() == "/oauth/token";
        let n = if is_token {
            0
        } else {
            a2.fetch_add(1, Ordering::SeqCst)
        };
        let fail = f2.load(Ordering::SeqCst);
        async move {
            let r = if is_token {
                if fail {
                    resp(503, None)
                } else {
                    let mut r = Response::new(Full::new(Bytes::from_static(
                        br#"{"access_token":"tok-SECRET-1","token_type":"Bearer","expires_in":3600}"#,
                    )));
                    r.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("application/json"),
                    );
                    r
                }
            } else if n == 0 {
                resp(401, None)
            } else {
                resp(200, None)
            };
            Ok::<_, Infallible>(r)
        }
    });
    let tokens = ClientCredentials::new(
        svc.clone(),
        "http://auth.example.com:9443/oauth/token",
        "client-id",
        "client-SECRET-2",
    )
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_auth(AuthLayer::oauth2(tokens))
        .build(svc.clone());
    let res = client
        .clone()
        .oneshot(req("GET", "http://api.example.com:8443/v1/me"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rs = rows(&snap);
    check_listed(&rs, &["SECRET", "tok-", "oauth", "client-id"]);
    let auth_host = [
        ("server.address", "auth.example.com"),
        ("server.port", "9443"),
    ];
    let api_host = [
        ("server.address", "api.example.com"),
        ("server.port", "8443"),
    ];
    assert_eq!(
        counter(&rs, "sturdy.auth.token.fetches", &auth_host),
        2,
        "{rs:#?}"
    );
    assert_eq!(
        counter(&rs, "sturdy.auth.token.rejections", &api_host),
        1,
        "{rs:#?}"
    );

    // A token endpoint that answers 503.
    token_fail.store(true, Ordering::SeqCst);
    let tokens = ClientCredentials::new(
        svc.clone(),
        "http://auth.example.com:9443/oauth/token",
        "client-id",
        "client-SECRET-2",
    )
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(1))
        .with_auth(AuthLayer::oauth2(tokens))
        .build(svc);
    let err = client
        .oneshot(req("GET", "http://api.example.com:8443/v1/me"))
        .await
        .unwrap_err();
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent,
        "{err}"
    );
    let rs = rows(&snap);
    check_listed(&rs, &["SECRET", "tok-", "oauth", "client-id"]);
    assert!(
        counter(
            &rs,
            "sturdy.auth.token.failures",
            &[auth_host[0], auth_host[1], ("error.type", "503")]
        ) >= 1,
        "{rs:#?}"
    );
}

/// metrics.md, `error.type`: "the status code for an HTTP status (`"503"`, `"404"`), except
/// three statuses that have a kind of their own: 401 is `auth`, 408 `timeout`, 429
/// `rate_limited`". A 408 and a 502 retried.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_error_type_of_408_and_502() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(api(vec![(408, None), (502, None), (200, None)]));
    let res = client
        .oneshot(req("GET", "http://api.example.com/x"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    for ty in ["timeout", "502"] {
        assert_eq!(
            counter(
                &rs,
                "sturdy.retry.retries",
                &[
                    ("server.address", "api.example.com"),
                    ("http.request.method", "GET"),
                    ("error.type", ty),
                ]
            ),
            1,
            "{ty}: {rs:#?}"
        );
    }
}

/// metrics.md: `sturdy.retry.stopped` reasons `past_deadline` and `not_replayable` ("the body
/// was not kept").
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_stop_reasons_past_deadline_and_not_replayable() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let slow_backoff = RetryLayer::new().with_backoff(
        Backoff::exponential(Duration::from_secs(5), Duration::from_secs(5)).unwrap(),
    );
    let client = ClientBuilder::new()
        .with_retry(slow_backoff)
        .build(api(vec![(503, None), (200, None)]));
    let mut r = req("GET", "http://api.example.com/x");
    r.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(1)));
    let res = client.oneshot(r).await.unwrap();
    assert_eq!(res.status(), 503);
    // A keyed POST whose 2 MiB body is over the replay limit.
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(api(vec![(503, None), (201, None)]));
    let big = Request::post("http://api.example.com/upload")
        .body(Full::new(Bytes::from(vec![b'z'; 2 * 1024 * 1024])))
        .unwrap();
    let res = client.oneshot(big).await.unwrap();
    assert_eq!(res.status(), 503);
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    for (m, reason) in [("GET", "past_deadline"), ("POST", "not_replayable")] {
        assert_eq!(
            counter(
                &rs,
                "sturdy.retry.stopped",
                &[
                    ("server.address", "api.example.com"),
                    ("http.request.method", m),
                    ("error.type", "503"),
                    ("sturdy.retry.stop_reason", reason),
                ]
            ),
            1,
            "{reason}: {rs:#?}"
        );
    }
}

/// metrics.md: `sturdy.retry.retries` counts "tries a layer below refused before they were
/// sent (`error.type` `rate_limited`, `circuit_open`, ...)", and `sturdy.retry.delay` has the
/// sources `rate_limit` and `breaker`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_refused_tries_and_their_delay_sources() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let host = ("server.address", "api.example.com");
    // An open breaker waited out under a deadline.
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_circuit_breaker(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_secs(1), Duration::from_secs(1)),
        )
        .build(api(vec![(500, None), (200, None)]));
    let mut r = req("GET", "http://api.example.com/x");
    r.extensions_mut()
        .insert(CallOptions::new().without_retries());
    assert_eq!(client.clone().oneshot(r).await.unwrap().status(), 500);
    let mut r = req("GET", "http://api.example.com/x");
    r.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(10)));
    assert_eq!(client.clone().oneshot(r).await.unwrap().status(), 200);
    // A local rate-limit refusal waited out under a deadline.
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(RateLimitLayer::adaptive_only().with_max_wait(Duration::from_millis(10)))
        .build(api(vec![(429, Some("2")), (200, None)]));
    let mut r = req("GET", "http://api.example.com/y");
    r.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let _ = client.clone().oneshot(r).await;
    let mut r = req("GET", "http://api.example.com/y");
    r.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(10)));
    assert_eq!(client.clone().oneshot(r).await.unwrap().status(), 200);
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    for ty in ["circuit_open", "rate_limited"] {
        assert!(
            counter(
                &rs,
                "sturdy.retry.retries",
                &[host, ("http.request.method", "GET"), ("error.type", ty)]
            ) >= 1,
            "{ty}: {rs:#?}"
        );
    }
    for src in ["breaker", "rate_limit"] {
        assert!(
            !histogram(
                &rs,
                "sturdy.retry.delay",
                &[
                    host,
                    ("http.request.method", "GET"),
                    ("sturdy.delay.source", src)
                ]
            )
            .is_empty(),
            "{src}: {rs:#?}"
        );
    }
}

/// metrics.md: "After `with_key(..)` their keys may be anything (a tenant, a token), so their
/// metrics carry no `server.*` labels at all" — for each layer that keeps state per key:
/// circuit breaker, adaptive concurrency, coalescing.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_custom_keys_carry_no_server_labels_in_any_layer() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let tenant = |_r: &Request<Full<Bytes>>| "tenant-7".to_owned();
    let cb = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_key(tenant)
        .layer(api(vec![(500, None)]));
    let _ = cb
        .clone()
        .oneshot(req("GET", "http://api.example.com:8443/x"))
        .await;
    let _ = cb
        .clone()
        .oneshot(req("GET", "http://api.example.com:8443/x"))
        .await;
    let slow = service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let ac = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .with_max_wait(Duration::from_millis(10))
        .with_key(tenant)
        .layer(slow);
    let first = tokio::spawn(
        ac.clone()
            .oneshot(req("GET", "http://api.example.com:8443/a")),
    );
    tokio::task::yield_now().await;
    let _ = ac
        .clone()
        .oneshot(req("GET", "http://api.example.com:8443/b"))
        .await;
    let _ = first.await;
    let co = CoalesceLayer::new().with_key(tenant).layer(slow);
    let a = tokio::spawn(
        co.clone()
            .oneshot(req("GET", "http://api.example.com:8443/c")),
    );
    let b = tokio::spawn(
        co.clone()
            .oneshot(req("GET", "http://api.example.com:8443/c")),
    );
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let rs = rows(&snap);
    check_listed(&rs, &["tenant-7"]);
    for name in [
        "sturdy.circuit.transitions",
        "sturdy.circuit.rejections",
        "sturdy.concurrency.rejections",
        "sturdy.coalesce.coalesced",
    ] {
        assert!(rs.iter().any(|r| r.name == name), "{name} missing: {rs:#?}");
    }
    for r in &rs {
        assert!(
            !r.labels.contains_key("server.address") && !r.labels.contains_key("server.port"),
            "{r:?}"
        );
    }
}

/// metrics.md: "The events of one call (a hedge sent or won, a call refused by a full
/// concurrency limit, a call that joined another) keep `key` `*` and carry the call's own
/// host". Coalescing with `with_max_hosts(1)`: the second host's callers join in the overflow
/// table and are counted under their own host.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_overflow_coalesced_calls_carry_their_own_host() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let slow = service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let co = CoalesceLayer::new().with_max_hosts(1).layer(slow);
    let mut tasks = Vec::new();
    for host in ["one.example.com:8001", "two.example.com:8002"] {
        for _ in 0..3 {
            let uri = format!("http://{host}/x");
            tasks.push(tokio::spawn(co.clone().oneshot(req("GET", &uri))));
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    for (h, p) in [("one.example.com", "8001"), ("two.example.com", "8002")] {
        assert_eq!(
            counter(
                &rs,
                "sturdy.coalesce.coalesced",
                &[
                    ("server.address", h),
                    ("server.port", p),
                    ("http.request.method", "GET"),
                ]
            ),
            2,
            "{h}: {rs:#?}"
        );
    }
}

/// metrics.md: `sturdy.hedge.sent` and `sturdy.hedge.won`, labelled by host and port.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_hedge_sent_and_won() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 40 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        }
    });
    let hedged = sturdy::hedge::HedgeLayer::new()
        .with_min_samples(10)
        .with_delay_bounds(Duration::from_millis(50), Duration::from_millis(50))
        .layer(svc);
    let uri = "http://api.example.com:8443/x?token=abc";
    for _ in 0..40 {
        hedged.clone().oneshot(req("GET", uri)).await.unwrap();
    }
    let t = tokio::time::Instant::now();
    hedged.clone().oneshot(req("GET", uri)).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "not hedged: {:?}",
        t.elapsed()
    );
    let rs = rows(&snap);
    check_listed(&rs, &["abc"]);
    let host = [
        ("server.address", "api.example.com"),
        ("server.port", "8443"),
    ];
    assert_eq!(counter(&rs, "sturdy.hedge.sent", &host), 1, "{rs:#?}");
    assert_eq!(counter(&rs, "sturdy.hedge.won", &host), 1, "{rs:#?}");
}

/// metrics.md: `sturdy.concurrency.limit`, "the adaptive limit of a host, as last changed";
/// the adaptive limit emits "whenever a success raises its whole number of calls".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_concurrency_limit_gauge_follows_the_limit() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 50)
        .with_initial_limit(2)
        .pair();
    let svc = layer.layer(api(vec![(200, None)]));
    for _ in 0..50 {
        svc.clone()
            .oneshot(req("GET", "http://api.example.com:8443/x"))
            .await
            .unwrap();
    }
    let now = handle.limit("api.example.com:8443").unwrap();
    assert!(now > 2, "the limit did not grow: {now}");
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    let g = gauge(
        &rs,
        "sturdy.concurrency.limit",
        &[
            ("server.address", "api.example.com"),
            ("server.port", "8443"),
        ],
    );
    assert_eq!(g, Some(now as f64), "{rs:#?}");
}

/// metrics.md, Labels: "`server.address` and `server.port`: the host called, split from the
/// request's authority ... Never the `user:password@` part, never a path or a query." A request
/// with no authority in its URI is keyed by its `Host` header (`ByHost`: "the URI's authority,
/// else the `Host` header"); a hostile one must not bring a secret, path or query into a label.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_a_hostile_host_header_brings_no_secret_into_labels() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    for host in [
        "user:pw0rd@api.example.com:8443",
        "api.example.com:8443/p?q=SECRETQ",
        "api.example.com?k=SECRETK",
    ] {
        let client = quick_retry().layer(api(vec![(503, None), (200, None)]));
        let mut r = req("GET", "/orders");
        r.headers_mut()
            .insert("host", http::HeaderValue::from_str(host).unwrap());
        let res = client.oneshot(r).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let rs = rows(&snap);
    let addresses: BTreeSet<(String, Option<String>)> = rs
        .iter()
        .map(|r| {
            (
                r.labels["server.address"].clone(),
                r.labels.get("server.port").cloned(),
            )
        })
        .collect();
    let leaked: Vec<&(String, Option<String>)> = addresses
        .iter()
        .filter(|(a, _)| {
            ["pw0rd", "user", "SECRET", "/", "?", "@"]
                .iter()
                .any(|s| a.contains(s))
        })
        .collect();
    assert!(leaked.is_empty(), "label values: {addresses:?}");
    check_listed(&rs, &["pw0rd", "user", "SECRETQ", "SECRETK"]);
}

/// metrics.md: `sturdy.circuit.open` is "1 while the breaker refuses calls (open, forced
/// open), 0 otherwise"; `sturdy.circuit.state` includes `forced_open`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_forced_open_breaker_gauge() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(api(vec![(200, None)]));
    let uri = "http://api.example.com:8443/x";
    svc.clone().oneshot(req("GET", uri)).await.unwrap();
    handle.force_open("api.example.com:8443");
    let err = svc.clone().oneshot(req("GET", uri)).await.unwrap_err();
    assert!(sturdy::core::find::<sturdy::core::CircuitOpen>(&*err).is_some());
    let host = [
        ("server.address", "api.example.com"),
        ("server.port", "8443"),
    ];
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    assert_eq!(
        gauge(&rs, "sturdy.circuit.open", &host),
        Some(1.0),
        "{rs:#?}"
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.circuit.transitions",
            &[host[0], host[1], ("sturdy.circuit.state", "forced_open")]
        ),
        1,
        "{rs:#?}"
    );
    assert_eq!(
        counter(&rs, "sturdy.circuit.rejections", &host),
        1,
        "{rs:#?}"
    );
    handle.force_close("api.example.com:8443");
    svc.clone().oneshot(req("GET", uri)).await.unwrap();
    let rs = rows(&snap);
    check_listed(&rs, &[]);
    assert_eq!(
        gauge(&rs, "sturdy.circuit.open", &host),
        Some(0.0),
        "{rs:#?}"
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.circuit.transitions",
            &[host[0], host[1], ("sturdy.circuit.state", "closed")]
        ),
        1,
        "{rs:#?}"
    );
}

/// RELIABILITY.md: for a request URI with `user:password@`, "keys and messages hold host and
/// port only"; metrics.md: "Never the `user:password@` part, never a path or a query". The
/// same for the host taken from a hostile `Host` header: the retry layer's message names the
/// host, and the rate limiter's pause metrics label it.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s51b_metrics_a_hostile_host_header_in_messages_and_pause_labels() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    sturdy::core::events::describe_metrics();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(api(vec![(429, Some("120"))]));
    let mut r = req("GET", "/orders");
    r.headers_mut().insert(
        "host",
        http::HeaderValue::from_static("api.example.com/x?api_key=SECRETZ"),
    );
    let err = client.oneshot(r).await.unwrap_err();
    let text = err.to_string();
    let rs = rows(&snap);
    let pauses: Vec<&Row> = rs
        .iter()
        .filter(|r| r.name == "sturdy.ratelimit.pauses")
        .collect();
    assert!(
        !text.contains("SECRETZ") && !format!("{err:?}").contains("SECRETZ"),
        "message: {text}"
    );
    assert!(
        pauses
            .iter()
            .all(|r| !r.labels["server.address"].contains("SECRETZ")),
        "{pauses:?}"
    );
}
