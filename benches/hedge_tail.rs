//! "The Tail at Scale" on the chaos server: a long latency tail, with and without hedging.
//!
//! cargo bench -p sturdy-benches --bench hedge_tail
//!
//! The server answers in 2 ms, except 1 % of requests, which take 100 ms (50× slower). Four
//! loops send GETs one after the other for 10,000 calls in all, first through a plain hyper-util
//! client, then through `HedgeLayer` with its defaults (hedge after the host's p95, budget 5 % +
//! 10). Each run starts with 300 unmeasured calls, so the hedged run starts with a full histogram.
//! The extra requests are counted by the server. Prints a Markdown table.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use sturdy::hedge::HedgeLayer;
use sturdy_chaos::{http_client, ChaosServer, Knobs};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

const CALLS: usize = 10_000;
const WARMUP: usize = 300;
const LOOPS: usize = 8;

async fn run<S>(client: S, url: &str, calls: usize) -> Vec<Duration>
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug + Send,
    S::Future: Send,
    S::Response: Send,
{
    let mut joins = Vec::new();
    for _ in 0..LOOPS {
        let client = client.clone();
        let url = url.to_owned();
        joins.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(calls / LOOPS);
            for _ in 0..calls / LOOPS {
                let req = Request::get(&url).body(Full::default()).unwrap();
                let start = Instant::now();
                client.clone().oneshot(req).await.unwrap();
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

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

async fn scenario<S>(name: &str, client: S, server: &ChaosServer) -> (Duration, f64)
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug + Send,
    S::Future: Send,
    S::Response: Send,
{
    let url = server.url("/orders/o_1");
    run(client.clone(), &url, WARMUP).await;
    let before = server.stats().api_requests;
    let lat = run(client, &url, CALLS).await;
    let sent = server.stats().api_requests - before;
    let extra = sent as f64 / CALLS as f64 - 1.0;
    if std::env::var_os("HEDGE_DEBUG").is_some() {
        let over = |ms: u64| {
            lat.iter()
                .filter(|d| **d > Duration::from_millis(ms))
                .count()
        };
        eprintln!(
            "{name}: p90 {:?} p95 {:?} p99.5 {:?} p99.8 {:?} p99.99 {:?}; >10ms {} >20ms {} >50ms {}",
            pct(&lat, 0.9), pct(&lat, 0.95), pct(&lat, 0.995), pct(&lat, 0.998), pct(&lat, 0.9999),
            over(10), over(20), over(50)
        );
    }
    println!(
        "| {name} | {} | {} | {} | {} | {sent} | {:.2} % |",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(pct(&lat, 0.999)),
        ms(*lat.last().unwrap()),
        extra * 100.0
    );
    (pct(&lat, 0.999), extra)
}

fn knobs() -> Knobs {
    Knobs {
        orders: 1,
        latency: Duration::from_millis(5),
        tail_latency: Some((0.01, Duration::from_millis(250))),
        ..Knobs::default()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    println!("{CALLS} GETs from {LOOPS} loops; 5 ms per call, 1 % of calls 250 ms\n");
    println!("| client | p50 | p99 | p99.9 | max | requests sent | extra |");
    println!("|---|---|---|---|---|---|---|");
    let server = ChaosServer::start(knobs()).await.unwrap();
    let (plain, _) = scenario("hyper-util, no hedging", http_client(), &server).await;

    let server = ChaosServer::start(knobs()).await.unwrap();
    let (layer, handle) = HedgeLayer::new().pair();
    let (hedged, extra) = scenario(
        "`HedgeLayer::new()` (p95, 5 % + 10)",
        layer.layer(http_client()),
        &server,
    )
    .await;
    let stats = handle.stats(&server.addr().to_string()).unwrap();
    println!(
        "\nhedged run: delay {:?}, {} hedges for {} calls, {} won by the hedge",
        stats.delay().unwrap_or_default(),
        stats.hedges(),
        stats.calls(),
        stats.hedge_wins()
    );
    println!(
        "p99.9 fell {:.1}x with {:.2} % extra requests",
        plain.as_secs_f64() / hedged.as_secs_f64(),
        extra * 100.0
    );
}
