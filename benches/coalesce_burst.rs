//! A burst of identical GETs against the chaos server, with and without coalescing.
//!
//! cargo bench -p sturdy-benches --bench coalesce_burst
//!
//! 1,000 GETs of the same page of orders start at once; the server takes 50 ms per request.
//! Prints how many requests reached the server and how long the burst took, as a Markdown table.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use sturdy::coalesce::CoalesceLayer;
use sturdy_chaos::{http_client, ChaosServer, Knobs};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

const BURST: usize = 1_000;

async fn burst<S, Rb>(client: S, url: &str) -> Duration
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<Rb>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
    Rb: hyper::body::Body + Send + 'static,
    Rb::Data: Send,
    Rb::Error: std::fmt::Debug,
{
    let start = Instant::now();
    let callers: Vec<_> = (0..BURST)
        .map(|_| {
            let req = Request::get(url).body(Full::default()).unwrap();
            let c = client.clone();
            tokio::spawn(async move {
                let res = c.oneshot(req).await.unwrap();
                res.into_body().collect().await.unwrap();
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap();
    }
    start.elapsed()
}

fn knobs() -> Knobs {
    Knobs {
        orders: 20,
        latency: Duration::from_millis(50),
        ..Knobs::default()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("{BURST} identical GETs at once; the server takes 50 ms per request\n");
    println!("| client | requests that reached the server | burst took |");
    println!("|---|---|---|");
    let server = ChaosServer::start(knobs()).await.unwrap();
    let took = burst(http_client(), &server.url("/orders?limit=20")).await;
    println!(
        "| hyper-util, no coalescing | {} | {:.0} ms |",
        server.stats().api_requests,
        took.as_secs_f64() * 1e3
    );
    let server = ChaosServer::start(knobs()).await.unwrap();
    let client = CoalesceLayer::new().layer(http_client());
    let took = burst(client, &server.url("/orders?limit=20")).await;
    println!(
        "| `CoalesceLayer::new()` | {} | {:.0} ms |",
        server.stats().api_requests,
        took.as_secs_f64() * 1e3
    );
}
