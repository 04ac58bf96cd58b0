//! Hedging against the chaos server's long tail, over loopback in real time (milliseconds).

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy_chaos::{http_client, ChaosServer, Knobs};
use sturdy_hedge::HedgeLayer;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

/// Runs `calls` GETs from `workers` concurrent loops; returns the sorted latencies.
async fn run<S>(client: S, url: String, calls: usize, workers: usize) -> Vec<Duration>
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<hyper::body::Incoming>>
        + Clone
        + Send
        + 'static,
    S::Error: std::fmt::Debug + Send,
    S::Future: Send,
{
    let mut joins = Vec::new();
    for _ in 0..workers {
        let client = client.clone();
        let url = url.clone();
        joins.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..calls / workers {
                let req = Request::get(&url).body(Full::default()).unwrap();
                let start = Instant::now();
                let res = client.clone().oneshot(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                out.push(start.elapsed());
            }
            out
        }));
    }
    let mut all = Vec::new();
    for j in joins {
        all.extend(j.await.unwrap());
    }
    all.sort();
    all
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_cuts_the_long_tail_for_a_few_percent_more_requests() {
    // 2 ms per call, 2 % of calls 40× slower (80 ms).
    let knobs = Knobs {
        orders: 1,
        latency: Duration::from_millis(2),
        tail_latency: Some((0.02, Duration::from_millis(80))),
        ..Knobs::default()
    };
    let calls = 1_200;
    let plain = ChaosServer::start(knobs.clone()).await.unwrap();
    let base = run(http_client(), plain.url("/orders/o_1"), calls, 8).await;

    let hedged = ChaosServer::start(knobs).await.unwrap();
    let (layer, handle) = HedgeLayer::new().with_min_samples(50).pair();
    let client = tower::Layer::layer(&layer, http_client());
    let with = run(client, hedged.url("/orders/o_1"), calls, 8).await;

    let (b99, h99) = (pct(&base, 0.99), pct(&with, 0.99));
    let extra = hedged.stats().api_requests as f64 / calls as f64 - 1.0;
    let stats = handle.stats(&hedged.addr().to_string()).unwrap();
    eprintln!(
        "p50 {:?} -> {:?}, p99 {b99:?} -> {h99:?}, extra {:.1} %, {stats:?}",
        pct(&base, 0.5),
        pct(&with, 0.5),
        extra * 100.0
    );
    assert!(
        b99 >= Duration::from_millis(80),
        "the tail is there without hedging"
    );
    assert!(h99 * 2 < b99, "hedging cuts p99 at least in half");
    assert!(stats.hedges() > 0);
    assert!(
        extra <= 0.08,
        "at most a few percent more requests: {extra}"
    );
    // A copy cancelled before it left (its connection still opening) never reaches the server.
    let seen = hedged.stats().api_requests;
    assert!(seen >= calls as u64 && seen <= calls as u64 + stats.hedges());
}
