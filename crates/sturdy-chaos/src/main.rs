//! The sturdy demo: the same workload against the same faulty API, first with a plain hyper
//! client, then with a naive retry loop, then through sturdy.
//!
//! `cargo run --release -p sturdy-chaos` runs it and exits; `-- --serve` starts the chaos server
//! with the demo's faults and keeps it running, printing its address and knobs.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use sturdy_chaos::{http_client, ChaosServer, Knobs, RetryAfterForm};
use tower::ServiceExt;

const ORDERS: usize = 200;

fn knobs() -> Knobs {
    Knobs {
        seed: 2026,
        idempotency: true,
        error_rate: 0.15,
        reset_after_commit_rate: 0.1,
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Seconds(1),
        ..Knobs::default()
    }
}

/// Order `n`. No client sets a key by hand: sturdy's stack adds one itself.
fn order(server: &ChaosServer, n: usize) -> Request<Full<Bytes>> {
    Request::post(server.url("/orders"))
        .header("content-type", "application/json")
        .body(Full::from(format!(r#"{{"item":"book","customer":{n}}}"#)))
        .expect("valid request")
}

#[derive(Default)]
struct Tally {
    ok: usize,
    failed: usize,
}

fn report(name: &str, t: &Tally, server: &ChaosServer) {
    let s = server.stats();
    println!(
        "{name:<28} {ok:>5} {failed:>7} {req:>9} {committed:>10} {dup:>11}",
        ok = t.ok,
        failed = t.failed,
        req = s.api_requests,
        committed = s.orders_committed,
        dup = s.duplicates_by_payload,
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().any(|a| a == "--serve") {
        let server = ChaosServer::start(knobs()).await?;
        println!("sturdy-chaos listening on {}", server.url(""));
        println!("knobs: {:#?}", server.knobs());
        println!("press Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
        return Ok(());
    }

    println!("{ORDERS} orders against an API that fails 15% of calls with 503, closes 10% of");
    println!("connections after committing the order, and answers one 429 with Retry-After: 1.\n");
    println!(
        "{:<28} {:>5} {:>7} {:>9} {:>10} {:>11}",
        "client", "ok", "failed", "requests", "committed", "duplicates"
    );

    // 1. A plain client: every fault reaches the caller.
    let server = ChaosServer::start(knobs()).await?;
    let client = http_client();
    let mut t = Tally::default();
    for n in 0..ORDERS {
        match client.request(order(&server, n)).await {
            Ok(r) if r.status() == StatusCode::CREATED => t.ok += 1,
            _ => t.failed += 1,
        }
    }
    report("plain hyper client", &t, &server);

    // 2. A naive loop: retry anything up to 4 times, no key, no backoff. Duplicates appear.
    let server = ChaosServer::start(knobs()).await?;
    let mut t = Tally::default();
    for n in 0..ORDERS {
        let mut done = false;
        for _ in 0..4 {
            if let Ok(r) = client.request(order(&server, n)).await {
                if r.status() == StatusCode::CREATED {
                    done = true;
                    break;
                }
            }
        }
        if done {
            t.ok += 1;
        } else {
            t.failed += 1;
        }
    }
    report("naive retry loop", &t, &server);

    // 3. sturdy: the composed stack (an Idempotency-Key per order, retries with jitter that honour
    // Retry-After within a budget, a breaker and adaptive rate limiting per host).
    let server = ChaosServer::start(knobs()).await?;
    let backoff =
        Backoff::decorrelated_jitter(Duration::from_millis(10), Duration::from_millis(200))?;
    let sturdy = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_backoff(backoff).with_max_attempts(6))
        .build(http_client());
    let mut t = Tally::default();
    for n in 0..ORDERS {
        match sturdy.clone().oneshot(order(&server, n)).await {
            Ok(r) if r.status() == StatusCode::CREATED => t.ok += 1,
            Ok(r) => {
                eprintln!("order {n}: {}", r.status());
                t.failed += 1;
            }
            Err(e) => {
                eprintln!("order {n}: {e}");
                t.failed += 1;
            }
        }
    }
    report("sturdy ClientBuilder", &t, &server);
    let s = server.stats();
    println!(
        "\nsturdy: {} injected 5xx, {} closed connections and {} 429 ridden out; {} responses replayed by key.",
        s.server_errors, s.resets, s.rate_limited, s.replayed
    );
    Ok(())
}
