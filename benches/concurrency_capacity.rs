//! An adaptive concurrency limit against the chaos server's capacity knob.
//!
//! cargo bench -p sturdy-benches --bench concurrency_capacity
//!
//! The server answers in 10 ms and serves N = 20 calls at once. Two server models:
//!
//! - "sheds at N": more than 20 in flight get 503 at once;
//! - "queues, sheds at 3N": past 20 in flight each call takes `10 ms × in_flight / 20` (the
//!   server shares itself out), and more than 60 in flight get 503 at once.
//!
//! 64 callers loop for 3 s behind each client: fixed limits chosen by hand (tower's
//! `GlobalConcurrencyLimitLayer`), no limit, and `AdaptiveConcurrencyLayer` with AIMD and with
//! Vegas (each starting at its default limit of 20 ... here from 40, above capacity, to show it
//! finding it). Goodput is successful responses per second. Then capacity drops to 10 for 3 s and
//! returns to 20 for 3 s, and the adaptive limit is sampled every 250 ms. Prints Markdown tables.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, Algorithm, ConcurrencyHandle};
use sturdy_chaos::{http_client, Capacity, ChaosServer, Knobs};
use tokio::time::Instant;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceExt};

const N: u32 = 20;
const CALLERS: usize = 64;
const RUN: Duration = Duration::from_secs(3);

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

async fn load<S>(client: &S, url: &str, for_: Duration) -> Arc<Tally>
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<hyper::body::Incoming>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Send,
{
    let tally = Arc::new(Tally::default());
    let until = Instant::now() + for_;
    let mut joins = Vec::new();
    for _ in 0..CALLERS {
        let client = client.clone();
        let url = url.to_owned();
        let tally = tally.clone();
        joins.push(tokio::spawn(async move {
            while Instant::now() < until {
                let req = Request::get(&url).body(Full::default()).unwrap();
                match client.clone().oneshot(req).await {
                    Ok(r) if r.status().is_success() => tally.ok.fetch_add(1, Ordering::Relaxed),
                    _ => tally.failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    tally
}

fn knobs(shed_above: u32) -> Knobs {
    Knobs {
        orders: 1,
        latency: Duration::from_millis(10),
        capacity: Some(Capacity {
            limit: N,
            shed_above,
        }),
        ..Knobs::default()
    }
}

async fn row<S>(name: &str, client: S, shed_above: u32, handle: Option<&ConcurrencyHandle>) -> f64
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<hyper::body::Incoming>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Send,
{
    let server = ChaosServer::start(knobs(shed_above)).await.unwrap();
    let url = server.url("/orders/o_1");
    // A short warm-up, unmeasured, so connections exist; the adaptive limit starts learning.
    load(&client, &url, Duration::from_millis(300)).await;
    let t = load(&client, &url, RUN).await;
    let secs = RUN.as_secs_f64();
    let goodput = t.ok.load(Ordering::Relaxed) as f64 / secs;
    let limit = handle
        .and_then(|h| h.limit(&server.addr().to_string()))
        .map_or_else(|| "-".to_owned(), |l| l.to_string());
    println!(
        "| {name} | {limit} | {goodput:.0} | {:.0} | {} |",
        t.failed.load(Ordering::Relaxed) as f64 / secs,
        server.stats().peak_in_flight
    );
    goodput
}

async fn model(title: &str, shed_above: u32) {
    println!("\n### {title}\n");
    println!(
        "| client | limit at the end | goodput (ok/s) | failed/s | peak in flight at the server |"
    );
    println!("|---|---|---|---|---|");
    let mut best: f64 = 0.0;
    for n in [10, 20, 30, 40] {
        let c = GlobalConcurrencyLimitLayer::new(n).layer(http_client());
        best = best.max(row(&format!("fixed limit {n}"), c, shed_above, None).await);
    }
    row("no limit", http_client(), shed_above, None).await;
    for (name, algo) in [
        ("adaptive, AIMD", Algorithm::Aimd),
        ("adaptive, Vegas", Algorithm::Vegas),
    ] {
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_algorithm(algo)
            .with_initial_limit(40)
            .pair();
        let g = row(name, layer.layer(http_client()), shed_above, Some(&handle)).await;
        println!(
            "|   {name}: {:.0} % of the best fixed limit | | | | |",
            g / best * 100.0
        );
    }
}

async fn recovery(algo: Algorithm, shed_above: u32) {
    let server = ChaosServer::start(knobs(shed_above)).await.unwrap();
    let url = server.url("/orders/o_1");
    let key = server.addr().to_string();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(algo)
        .with_initial_limit(40)
        .pair();
    let client = layer.layer(http_client());
    let mut line = Vec::new();
    for (cap, shed) in [(N, shed_above), (N / 2, shed_above / 2), (N, shed_above)] {
        server.update(|k| {
            k.capacity = Some(Capacity {
                limit: cap,
                shed_above: shed,
            });
        });
        let c = client.clone();
        let u = url.clone();
        let running = tokio::spawn(async move { load(&c, &u, RUN).await });
        let mut samples = Vec::new();
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            samples.push(handle.limit(&key).unwrap_or(0).to_string());
        }
        running.await.unwrap();
        line.push(format!("capacity {cap}: {}", samples.join(" ")));
    }
    println!("\n{algo:?}, limit every 250 ms:\n");
    for l in line {
        println!("- {l}");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("{CALLERS} callers, 3 s per client; server: 10 ms per call, capacity N = {N}");
    model("Server sheds at N (503 past 20 in flight)", N).await;
    model("Server queues past N, sheds at 3N", 3 * N).await;
    println!("\n### Recovery: capacity 20, then 10, then 20 again");
    recovery(Algorithm::Aimd, N).await;
    recovery(Algorithm::Vegas, 3 * N).await;
}
