//! docs/guides/metrics.md for the newer layers: `sturdy.hedge.sent` and `sturdy.hedge.won` as
//! the hedging layer counts them, with and without `with_key`; the adaptive limit's gauge as it
//! grows; the retry metrics of calls made through `SturdyMiddleware`. A thread-local
//! `DebuggingRecorder` on current-thread runtimes.
#![cfg(feature = "full")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::events::Event;
use sturdy::core::BoxError;
use sturdy::hedge::HedgeLayer;
use sturdy::reqwest::SturdyMiddleware;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tower::{service_fn, Layer, ServiceExt};

#[derive(Debug)]
struct Seen {
    name: String,
    labels: BTreeMap<String, String>,
    value: DebugValue,
}

fn seen(snap: &Snapshotter) -> Vec<Seen> {
    snap.snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _, _, value)| {
            let (_, key) = ck.into_parts();
            Seen {
                name: key.name().to_owned(),
                labels: key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect(),
                value,
            }
        })
        .collect()
}

fn count(all: &[Seen], name: &str) -> (u64, Vec<BTreeMap<String, String>>) {
    let mut n = 0;
    let mut labels = Vec::new();
    for s in all.iter().filter(|s| s.name == name) {
        if let DebugValue::Counter(c) = s.value {
            if c > 0 {
                n += c;
                labels.push(s.labels.clone());
            }
        }
    }
    (n, labels)
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn get_req(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

/// An API at 10 ms; the request after `slow_next` is set takes 10 s.
fn api(
    slow_next: Arc<AtomicBool>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_r: Request<Full<Bytes>>| {
        let ms = if slow_next.swap(false, Ordering::SeqCst) {
            10_000
        } else {
            10
        };
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        }
    })
}

async fn burst<S>(svc: &S, uri: &str, n: usize)
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(svc.clone().oneshot(get_req(uri))))
        .collect();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("no hang")
            .unwrap()
            .unwrap();
    }
}

/// metrics.md: "`sturdy.hedge.sent` | counter | ... | `server.address`, `server.port` | second
/// copies of slow calls sent" and "`sturdy.hedge.won` ... second copies that answered first":
/// the counts match the handle's, with the host and port as labels.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn hedges_sent_and_won_are_counted_with_the_host() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let slow = Arc::new(AtomicBool::new(false));
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api(slow.clone()));
    let uri = "http://api.example.com:8443/orders?token=abc";
    for _ in 0..8 {
        burst(&svc, uri, 16).await;
    }
    assert_eq!(count(&seen(&snap), "sturdy.hedge.sent").0, 0);
    for _ in 0..3 {
        slow.store(true, Ordering::SeqCst);
        burst(&svc, uri, 1).await;
    }
    let s = handle.stats("api.example.com:8443").expect("stats by host");
    let all = seen(&snap);
    let (sent, sent_labels) = count(&all, "sturdy.hedge.sent");
    let (won, won_labels) = count(&all, "sturdy.hedge.won");
    eprintln!("{s:?}; sent {sent} {sent_labels:?}; won {won}");
    assert_eq!((s.hedges(), s.hedge_wins()), (3, 3));
    assert_eq!((sent, won), (3, 3));
    let want = map(&[
        ("server.address", "api.example.com"),
        ("server.port", "8443"),
    ]);
    assert!(sent_labels.iter().all(|l| l == &want), "{sent_labels:?}");
    assert!(won_labels.iter().all(|l| l == &want), "{won_labels:?}");
}

/// metrics.md: "After `with_key(..)` their keys may be anything (a tenant, a token), so their
/// metrics carry no `server.*` labels at all; the key is still in the event (`key`) for a
/// callback, whose `host` field is then `None`."
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_keyed_hedging_layer_labels_no_host() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let e = events.clone();
    let slow = Arc::new(AtomicBool::new(false));
    let layer = HedgeLayer::new()
        .with_key(|_req: &Request<Full<Bytes>>| "tenant-secret-42".to_owned())
        .on_event(move |ev: &Event<'_>| {
            if let Event::HedgeSent { key, host, .. } = ev {
                e.lock()
                    .unwrap()
                    .push((key.to_string(), host.map(|h| h.to_string())));
            }
        });
    let svc = layer.layer(api(slow.clone()));
    for _ in 0..8 {
        burst(&svc, "http://api.example.com/", 16).await;
    }
    slow.store(true, Ordering::SeqCst);
    burst(&svc, "http://api.example.com/", 1).await;
    let all = seen(&snap);
    let (sent, labels) = count(&all, "sturdy.hedge.sent");
    assert_eq!(sent, 1);
    assert!(labels.iter().all(|l| l.is_empty()), "{labels:?}");
    assert!(
        !format!("{all:?}").contains("tenant-secret-42"),
        "a custom key reached a label"
    );
    assert_eq!(
        events.lock().unwrap().clone(),
        vec![("tenant-secret-42".to_owned(), None)]
    );
}

/// metrics.md: the adaptive concurrency limit emits "one whenever a success raises its whole
/// number of calls", and the gauge is "the adaptive limit of a host, as last changed". Under load
/// the limit grows; the gauge follows it and each change is one event.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_limit_gauge_follows_growth_under_load() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let changes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let c = changes.clone();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .on_event(move |ev: &Event<'_>| {
            if let Event::ConcurrencyLimitChanged { from, to, .. } = ev {
                c.lock().unwrap().push((*from, *to));
            }
        })
        .pair();
    let svc = layer.layer(api(Arc::new(AtomicBool::new(false))));
    for _ in 0..10 {
        burst(&svc, "http://api.example.com/", 20).await;
    }
    let limit = handle.limit("api.example.com").unwrap();
    assert!(limit > 20, "{limit}");
    let changes = changes.lock().unwrap().clone();
    assert!(!changes.is_empty());
    assert!(changes.iter().all(|(f, t)| t > f), "{changes:?}");
    assert_eq!(changes.last().unwrap().1, limit);
    let all = seen(&snap);
    let gauge: Vec<_> = all
        .iter()
        .filter(|s| s.name == "sturdy.concurrency.limit")
        .collect();
    assert_eq!(gauge.len(), 1, "{gauge:?}");
    assert!(
        matches!(gauge[0].value, DebugValue::Gauge(v) if v.into_inner() == limit as f64),
        "{gauge:?} vs {limit}"
    );
    assert_eq!(
        gauge[0].labels,
        map(&[("server.address", "api.example.com")])
    );
}

/// metrics.md's retry metrics for calls made with reqwest through `SturdyMiddleware`: two 503s
/// then a 200 count two retries (`error.type` "503"), two delays in seconds, no stop; labels are
/// the loopback host and its port, never the path or query.
#[tokio::test(flavor = "current_thread")]
async fn retries_through_the_middleware_are_counted_with_host_port_and_method() {
    #[derive(Clone, Default)]
    struct Api(Arc<AtomicUsize>);
    async fn flaky(State(api): State<Api>) -> StatusCode {
        if api.0.fetch_add(1, Ordering::SeqCst) < 2 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        }
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let app = Router::new()
        .route("/orders", get(flaky))
        .with_state(Api::default());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });

    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let retry = RetryLayer::new().with_seed(15).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10)).unwrap(),
    );
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new().with_retry(retry).build(next)
        }))
        .build();
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        client
            .get(format!("http://{addr}/orders?api_key=TOPSECRET"))
            .send(),
    )
    .await
    .expect("no hang")
    .unwrap();
    assert_eq!(res.status(), 200);
    let all = seen(&snap);
    eprintln!("{all:?}");
    assert!(!format!("{all:?}").contains("TOPSECRET"));
    let port = addr.port().to_string();
    let (retries, labels) = count(&all, "sturdy.retry.retries");
    assert_eq!(retries, 2);
    assert_eq!(
        labels,
        vec![map(&[
            ("server.address", "127.0.0.1"),
            ("server.port", &port),
            ("http.request.method", "GET"),
            ("error.type", "503"),
        ])]
    );
    let delays: Vec<f64> = all
        .iter()
        .filter(|s| s.name == "sturdy.retry.delay")
        .flat_map(|s| match &s.value {
            DebugValue::Histogram(v) => v.iter().map(|x| x.into_inner()).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(delays.len(), 2, "{delays:?}");
    assert!(
        delays.iter().all(|d| (0.001..=0.011).contains(d)),
        "delays in seconds between 2 and 10 ms: {delays:?}"
    );
    assert_eq!(count(&all, "sturdy.retry.stopped").0, 0);
}

/// metrics.md: `sturdy.retry.stopped` counts "retryable failures that were not retried", with
/// `sturdy.retry.stop_reason` `not_replayable` ("the body was not kept"). A 2 MiB body streamed
/// through `SturdyMiddleware` to a server answering 503 is sent once (reqwest.md: "a larger one
/// is sent once"), and that stop is counted.
#[tokio::test(flavor = "current_thread")]
async fn a_body_too_large_to_replay_counts_a_not_replayable_stop() {
    #[derive(Clone, Default)]
    struct Api(Arc<AtomicUsize>);
    async fn down(State(api): State<Api>, _body: Bytes) -> StatusCode {
        api.0.fetch_add(1, Ordering::SeqCst);
        StatusCode::SERVICE_UNAVAILABLE
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let api = Api::default();
    let app = Router::new()
        .route("/orders", axum::routing::post(down))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(api.clone());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });

    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let retry = RetryLayer::new().with_seed(15).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10)).unwrap(),
    );
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new().with_retry(retry).build(next)
        }))
        .build();
    let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = (0..32)
        .map(|_| Ok(http_body::Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))))
        .collect();
    let body = reqwest::Body::wrap(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )));
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        client
            .post(format!("http://{addr}/orders"))
            .body(body)
            .send(),
    )
    .await
    .expect("no hang")
    .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(api.0.load(Ordering::SeqCst), 1);
    let all = seen(&snap);
    let port = addr.port().to_string();
    let (stopped, labels) = count(&all, "sturdy.retry.stopped");
    assert_eq!(stopped, 1, "{all:?}");
    assert_eq!(
        labels,
        vec![map(&[
            ("server.address", "127.0.0.1"),
            ("server.port", &port),
            ("http.request.method", "POST"),
            ("error.type", "503"),
            ("sturdy.retry.stop_reason", "not_replayable"),
        ])]
    );
    assert_eq!(count(&all, "sturdy.retry.retries").0, 0);
}
