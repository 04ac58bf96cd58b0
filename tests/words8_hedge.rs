//! docs/guides/hedge.md and sturdy-hedge's rustdoc, read literally: the guide's snippet, the
//! default delay bounds (never under 1 ms, never over 10 s), the 12.5 % resolution of the
//! percentile, "a call answered without ever waiting counts as zero", the 1,024-host bound, and
//! the service's `Send + Sync + Clone`. Paused time, in process.
#![cfg(feature = "full")]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::core::BoxError;
use sturdy::hedge::HedgeLayer;
use tower::{service_fn, Layer, ServiceBuilder, ServiceExt};

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

/// An API that answers after `latency` (no wait at all for zero).
fn api(
    latency: Duration,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_r: Request<Full<Bytes>>| async move {
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    })
}

/// `n` calls at once to `host` through `svc`.
async fn burst<S>(svc: &S, host: &str, n: usize)
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut tasks = Vec::new();
    for _ in 0..n {
        let svc = svc.clone();
        let uri = format!("http://{host}/");
        tasks.push(tokio::spawn(async move { svc.oneshot(get(&uri)).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// The guide's snippet compiles, and the handle reads "calls, hedges, wins, the current delay".
#[tokio::test(start_paused = true)]
async fn the_guides_snippet_builds_and_the_handle_reads_the_stats() {
    let http_client = api(Duration::from_millis(5));
    let (layer, handle) = HedgeLayer::new().pair();
    let client = ServiceBuilder::new().layer(layer).service(http_client);
    burst(&client, "api.example.com", 10).await;
    let s = handle.stats("api.example.com").expect("stats");
    assert_eq!(s.calls(), 10);
    assert_eq!((s.hedges(), s.hedge_wins()), (0, 0));
    assert_eq!(s.delay(), None, "fewer than 100 samples: no delay yet");
}

/// "Nothing is hedged until the recent windows hold 100 samples"; then "the delay is never
/// shorter than 1 ms": a host whose calls never wait (each counted as zero) gets 1 ms.
#[tokio::test(start_paused = true)]
async fn an_instant_host_gets_the_1ms_floor_after_100_samples() {
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api(Duration::ZERO));
    burst(&svc, "fast.example.com", 99).await;
    assert_eq!(handle.stats("fast.example.com").unwrap().delay(), None);
    burst(&svc, "fast.example.com", 17).await;
    let s = handle.stats("fast.example.com").unwrap();
    assert!(s.samples() >= 100, "{s:?}");
    assert_eq!(s.delay(), Some(Duration::from_millis(1)), "{s:?}");
    assert_eq!(
        handle.latency_percentile("fast.example.com", 0.95),
        Some(Duration::ZERO),
        "a call answered without waiting counts as zero"
    );
}

/// "... nor longer than 10 s": a host whose calls take 30 s is hedged after 10 s at most.
#[tokio::test(start_paused = true)]
async fn a_slow_host_gets_at_most_the_10s_ceiling() {
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api(Duration::from_secs(30)));
    burst(&svc, "slow.example.com", 116).await;
    let s = handle.stats("slow.example.com").unwrap();
    assert_eq!(s.delay(), Some(Duration::from_secs(10)), "{s:?}");
}

/// "log-linear buckets of 12.5 %": the p95 of a host that always takes 5 ms is read within
/// 12.5 % above it.
#[tokio::test(start_paused = true)]
async fn the_percentile_of_a_5ms_host_is_within_one_bucket() {
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api(Duration::from_millis(5)));
    burst(&svc, "five.example.com", 116).await;
    let s = handle.stats("five.example.com").unwrap();
    let d = s.delay().expect("a delay");
    assert!(
        d >= Duration::from_millis(5) && d <= Duration::from_micros(5_625),
        "{d:?}"
    );
    let p = handle.latency_percentile("five.example.com", 0.5).unwrap();
    assert!(
        p >= Duration::from_millis(5) && p <= Duration::from_micros(5_625),
        "{p:?}"
    );
    for q in [0.0, 1.0, -1.0, 2.0, f64::NAN] {
        assert_eq!(
            handle.latency_percentile("five.example.com", q),
            None,
            "{q}"
        );
    }
    assert_eq!(handle.latency_percentile("nobody.example.com", 0.5), None);
}

/// "at most 1,024 hosts (`.with_max_hosts(n)`)"; the rustdoc adds that past it, with every
/// host recent, "new hosts share one overflow state" (listed by the handle as `*`).
#[tokio::test(start_paused = true)]
async fn at_most_1024_hosts_are_kept_by_default_then_one_overflow_state() {
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api(Duration::ZERO));
    for i in 0..1100 {
        svc.clone()
            .oneshot(get(&format!("http://h{i}.example.com/")))
            .await
            .unwrap();
    }
    let all = handle.all();
    let hosts = all
        .iter()
        .filter(|(k, _)| k.ends_with(".example.com"))
        .count();
    assert_eq!(hosts, 1024);
    let overflow: Vec<_> = all.iter().filter(|(k, _)| k == "*").collect();
    assert_eq!(overflow.len(), 1, "{overflow:?}");
    assert_eq!(overflow[0].1.calls(), 76);
    assert_eq!(all.len(), 1025);
}

/// The layer and its service are `Send + Sync + Clone` (the guide clones them per call), and
/// the service's error type is `BoxError`.
#[test]
fn the_layer_and_service_are_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>(_: &T) {}
    let layer = HedgeLayer::new();
    check(&layer);
    let svc = layer.layer(api(Duration::ZERO));
    check(&svc);
    fn boxed<S: tower::Service<Request<Full<Bytes>>, Error = BoxError>>(_: &S) {}
    boxed(&svc);
}
