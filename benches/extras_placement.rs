//! Where coalescing, hedging and the adaptive concurrency limit go in a stack, measured on the
//! chaos server: each layer in the place proposed for it and in the obvious other place.
//!
//! cargo bench -p sturdy-benches --bench extras_placement
//!
//! 1. Coalesce outside or inside Retry: 200 identical GETs at once; the server takes 20 ms and
//!    fails the first request with 503. Counts the requests that reached the server.
//! 2. Hedge inside or outside Retry: 4,000 GETs from 8 loops; 5 ms per call, 1 % of calls
//!    250 ms, 5 % of calls answered 503 (retried after 10 to 100 ms). Latency percentiles and
//!    extra requests.
//! 3. The adaptive limit (Vegas) below or above a client-side rate limit of 1,000 calls/s: 64
//!    callers for 3 s; the server serves 20 at once in 10 ms (2,000/s), queues past that.
//!    Goodput and the limit it learned.
//!
//! Prints Markdown tables.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, Algorithm};
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy_chaos::{http_client, Capacity, ChaosServer, Knobs};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

fn retry() -> RetryLayer {
    let backoff =
        Backoff::decorrelated_jitter(Duration::from_millis(10), Duration::from_millis(100))
            .expect("valid backoff");
    RetryLayer::new().with_backoff(backoff).with_seed(7)
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

// ===== 1. coalescing =====

async fn burst<S, Rb>(client: S, url: &str) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<Rb>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    Rb: hyper::body::Body + Send + 'static,
    Rb::Data: Send,
{
    let callers: Vec<_> = (0..200)
        .map(|_| {
            let req = Request::get(url).body(Full::default()).unwrap();
            let c = client.clone();
            tokio::spawn(async move {
                match c.oneshot(req).await {
                    Ok(res) if res.status().is_success() => res.into_body().collect().await.is_ok(),
                    _ => false,
                }
            })
        })
        .collect();
    let mut ok = 0;
    for c in callers {
        ok += usize::from(c.await.unwrap());
    }
    ok
}

async fn coalescing() {
    println!("\n### Coalesce outside or inside Retry\n");
    println!("| stack (outermost first) | calls that succeeded | requests at the server |");
    println!("|---|---|---|");
    let knobs = || Knobs {
        orders: 5,
        latency: Duration::from_millis(20),
        fail_next: 1,
        ..Knobs::default()
    };
    let server = ChaosServer::start(knobs()).await.unwrap();
    let client = ServiceBuilder::new()
        .layer(CoalesceLayer::new())
        .layer(retry())
        .service(http_client());
    let ok = burst(client, &server.url("/orders?limit=5")).await;
    println!(
        "| Coalesce → Retry → client | {ok} / 200 | {} |",
        server.stats().api_requests
    );
    let server = ChaosServer::start(knobs()).await.unwrap();
    let client = ServiceBuilder::new()
        .layer(retry())
        .layer(CoalesceLayer::new())
        .service(http_client());
    let ok = burst(client, &server.url("/orders?limit=5")).await;
    println!(
        "| Retry → Coalesce → client | {ok} / 200 | {} |",
        server.stats().api_requests
    );
    let server = ChaosServer::start(knobs()).await.unwrap();
    let client = ServiceBuilder::new()
        .layer(retry().without_budget())
        .layer(CoalesceLayer::new())
        .service(http_client());
    let ok = burst(client, &server.url("/orders?limit=5")).await;
    println!(
        "| Retry without a budget → Coalesce → client | {ok} / 200 | {} |",
        server.stats().api_requests
    );
}

// ===== 2. hedging =====

async fn run<S>(client: S, url: &str, calls: usize) -> (Vec<Duration>, usize)
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Error: Send,
    S::Future: Send,
    S::Response: Send,
{
    let loops = 8;
    let mut joins = Vec::new();
    for _ in 0..loops {
        let client = client.clone();
        let url = url.to_owned();
        joins.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut failed = 0;
            for _ in 0..calls / loops {
                let req = Request::get(&url).body(Full::default()).unwrap();
                let start = Instant::now();
                if client.clone().oneshot(req).await.is_err() {
                    failed += 1;
                }
                out.push(start.elapsed());
            }
            (out, failed)
        }));
    }
    let mut all = Vec::new();
    let mut failed = 0;
    for j in joins {
        let (o, f) = j.await.unwrap();
        all.extend(o);
        failed += f;
    }
    all.sort();
    (all, failed)
}

async fn hedging() {
    println!("\n### Hedge inside or outside Retry\n");
    println!("| stack (outermost first) | p50 | p99 | p99.9 | requests per call |");
    println!("|---|---|---|---|---|");
    let knobs = || Knobs {
        orders: 1,
        latency: Duration::from_millis(5),
        tail_latency: Some((0.01, Duration::from_millis(250))),
        error_rate: 0.05,
        ..Knobs::default()
    };
    const CALLS: usize = 4_000;
    for inside in [true, false] {
        let server = ChaosServer::start(knobs()).await.unwrap();
        let url = server.url("/orders/o_1");
        let name = if inside {
            "Retry → Hedge → client"
        } else {
            "Hedge → Retry → client"
        };
        let (lat, _) = if inside {
            let c = ServiceBuilder::new()
                .layer(retry())
                .layer(HedgeLayer::new())
                .service(http_client());
            run(c.clone(), &url, 300).await;
            let before = server.stats().api_requests;
            let r = run(c, &url, CALLS).await;
            let sent = server.stats().api_requests - before;
            print_row(name, &r.0, sent, CALLS);
            r
        } else {
            let c = ServiceBuilder::new()
                .layer(HedgeLayer::new())
                .layer(retry())
                .service(http_client());
            run(c.clone(), &url, 300).await;
            let before = server.stats().api_requests;
            let r = run(c, &url, CALLS).await;
            let sent = server.stats().api_requests - before;
            print_row(name, &r.0, sent, CALLS);
            r
        };
        drop(lat);
    }
    let server = ChaosServer::start(knobs()).await.unwrap();
    let url = server.url("/orders/o_1");
    let c = ServiceBuilder::new().layer(retry()).service(http_client());
    run(c.clone(), &url, 300).await;
    let before = server.stats().api_requests;
    let (lat, _) = run(c, &url, CALLS).await;
    print_row(
        "Retry → client (no hedging)",
        &lat,
        server.stats().api_requests - before,
        CALLS,
    );
}

fn print_row(name: &str, lat: &[Duration], sent: u64, calls: usize) {
    println!(
        "| {name} | {} | {} | {} | {:.3} |",
        ms(pct(lat, 0.5)),
        ms(pct(lat, 0.99)),
        ms(pct(lat, 0.999)),
        sent as f64 / calls as f64
    );
}

// ===== 3. the adaptive limit and a rate limiter =====

async fn goodput<S>(client: &S, url: &str, for_: Duration) -> f64
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    S::Response: Send,
{
    let ok = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + for_;
    let mut joins = Vec::new();
    for _ in 0..64 {
        let client = client.clone();
        let url = url.to_owned();
        let ok = ok.clone();
        joins.push(tokio::spawn(async move {
            while Instant::now() < until {
                let req = Request::get(&url).body(Full::default()).unwrap();
                if client.clone().oneshot(req).await.is_ok() {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    ok.load(Ordering::Relaxed) as f64 / for_.as_secs_f64()
}

async fn limits() {
    println!("\n### The adaptive limit (Vegas) below or above a rate limiter (1,000/s)\n");
    println!("| stack (outermost first) | goodput (ok/s) | limit learned |");
    println!("|---|---|---|");
    let knobs = || Knobs {
        orders: 1,
        latency: Duration::from_millis(10),
        capacity: Some(Capacity {
            limit: 20,
            shed_above: 60,
        }),
        ..Knobs::default()
    };
    let quota = || {
        RateLimitLayer::new(
            Quota::per_second(1_000)
                .expect("valid quota")
                .with_burst(20)
                .expect("valid burst"),
        )
    };
    for below in [true, false] {
        let server = ChaosServer::start(knobs()).await.unwrap();
        let url = server.url("/orders/o_1");
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_algorithm(Algorithm::Vegas)
            .pair();
        let (name, g) = if below {
            let c = ServiceBuilder::new()
                .layer(quota())
                .layer(layer)
                .service(http_client());
            goodput(&c, &url, Duration::from_millis(500)).await;
            (
                "RateLimit → AdaptiveConcurrency → client",
                goodput(&c, &url, Duration::from_secs(3)).await,
            )
        } else {
            let c = ServiceBuilder::new()
                .layer(layer)
                .layer(quota())
                .service(http_client());
            goodput(&c, &url, Duration::from_millis(500)).await;
            (
                "AdaptiveConcurrency → RateLimit → client",
                goodput(&c, &url, Duration::from_secs(3)).await,
            )
        };
        let l = handle.limit(&server.addr().to_string()).unwrap_or(0);
        println!("| {name} | {g:.0} | {l} |");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    coalescing().await;
    hedging().await;
    limits().await;
}
