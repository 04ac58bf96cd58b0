//! The orders demo: the same orders against the same faulty API, with a plain hyper client, a
//! naive retry loop and sturdy's `ClientBuilder`, each against a fresh server with the same seed.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use sturdy_chaos::{http_client, ChaosServer, Knobs, RetryAfterForm, Stats};
use tokio::time::Instant;
use tower::ServiceExt as _;

use super::args::OrdersArgs;
use super::progress::Progress;
use super::DemoError;

/// The faults of the demo (also used by `--serve`).
pub(crate) fn knobs() -> Knobs {
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

/// The three clients, in the order they run.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Every fault reaches the caller.
    Plain,
    /// Retries anything up to 4 times, with no key and no backoff: duplicates appear.
    Naive,
    /// The composed stack: an `Idempotency-Key` per order, retries with jitter that honour
    /// `Retry-After` within a budget, a breaker and adaptive rate limiting per host.
    Sturdy,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain hyper client",
            Self::Naive => "naive retry loop",
            Self::Sturdy => "sturdy ClientBuilder",
        }
    }
}

/// One client's run: what it saw and what the server saw.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ClientReport {
    /// The row's label in the table.
    pub(crate) name: &'static str,
    /// Orders the client saw succeed (201).
    pub(crate) succeeded: usize,
    /// Orders the client gave up on (an error, or a status other than 201).
    pub(crate) failed: usize,
    /// Orders the server committed with a payload it had already committed.
    pub(crate) duplicates: u64,
    /// Requests the orders API received.
    pub(crate) requests: u64,
    /// Orders the server committed.
    pub(crate) committed: u64,
    /// 429 responses the server sent.
    pub(crate) rate_limited: u64,
    /// Requests to the token endpoint (0: this scenario needs no credentials).
    pub(crate) token_requests: u64,
    /// The client's wall time for all its orders, in milliseconds.
    pub(crate) wall_ms: u64,
    #[serde(skip)]
    server: Stats,
}

/// The `--json` output.
#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    orders: usize,
    clients: JsonClients<'a>,
}

#[derive(Debug, Serialize)]
struct JsonClients<'a> {
    plain: &'a ClientReport,
    naive: &'a ClientReport,
    sturdy: &'a ClientReport,
}

const HEADER: &str = "client                          ok  failed  requests  committed  duplicates";

fn row(r: &ClientReport) -> String {
    format!(
        "{:<28} {:>5} {:>7} {:>9} {:>10} {:>11}",
        r.name, r.succeeded, r.failed, r.requests, r.committed, r.duplicates
    )
}

/// Runs the demo and prints the table (or, with `--json`, one JSON object) on stdout.
pub(crate) async fn main(args: &OrdersArgs) -> Result<(), DemoError> {
    use std::io::IsTerminal as _;
    let mut progress = Progress::new(!args.json && std::io::stdout().is_terminal());
    if !args.json {
        say!(
            "{} orders against an API that fails 15% of calls with 503, closes 10% of",
            args.orders
        );
        say!("connections after committing the order, and answers one 429 with Retry-After: 1.\n");
        say!("{HEADER}");
    }
    let mut one = async |kind| {
        let r = run(kind, args.orders, &mut progress).await?;
        if !args.json {
            say!("{}", row(&r));
        }
        Ok::<_, DemoError>(r)
    };
    let (plain, naive, sturdy) = (
        &one(Kind::Plain).await?,
        &one(Kind::Naive).await?,
        &one(Kind::Sturdy).await?,
    );
    if args.json {
        let out = JsonReport {
            orders: args.orders,
            clients: JsonClients {
                plain,
                naive,
                sturdy,
            },
        };
        say!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let s = &sturdy.server;
        say!(
            "\nsturdy: {} injected 5xx, {} closed connections and {} 429 ridden out; {} responses replayed by key.",
            s.server_errors, s.resets, s.rate_limited, s.replayed
        );
    }
    Ok(())
}

/// Sends `orders` orders with one client against a fresh server.
async fn run(
    kind: Kind,
    orders: usize,
    progress: &mut Progress,
) -> Result<ClientReport, DemoError> {
    let server = ChaosServer::start(knobs()).await?;
    let http = http_client();
    let backoff =
        Backoff::decorrelated_jitter(Duration::from_millis(10), Duration::from_millis(200))?;
    let sturdy = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_backoff(backoff).with_max_attempts(6))
        .build(http.clone());
    let (mut succeeded, mut failed) = (0, 0);
    let started = Instant::now();
    for n in 0..orders {
        progress.update(&format!("{}: {n}/{orders} orders", kind.name()));
        let ok = match kind {
            Kind::Plain => matches!(
                http.request(order(&server, n)).await,
                Ok(r) if r.status() == StatusCode::CREATED
            ),
            Kind::Naive => {
                let mut done = false;
                for _ in 0..4 {
                    if let Ok(r) = http.request(order(&server, n)).await {
                        if r.status() == StatusCode::CREATED {
                            done = true;
                            break;
                        }
                    }
                }
                done
            }
            Kind::Sturdy => match sturdy.clone().oneshot(order(&server, n)).await {
                Ok(r) if r.status() == StatusCode::CREATED => true,
                Ok(r) => {
                    progress.note(&format!("order {n}: {}", r.status()));
                    false
                }
                Err(e) => {
                    progress.note(&format!("order {n}: {e}"));
                    false
                }
            },
        };
        if ok {
            succeeded += 1;
        } else {
            failed += 1;
        }
    }
    let wall = started.elapsed();
    let s = server.stats();
    progress.finish(&format!(
        "{}: {orders}/{orders} orders sent in {} ms ({succeeded} succeeded, {failed} failed)",
        kind.name(),
        wall.as_millis()
    ));
    Ok(ClientReport {
        name: kind.name(),
        succeeded,
        failed,
        duplicates: s.duplicates_by_payload,
        requests: s.api_requests,
        committed: s.orders_committed,
        rate_limited: s.rate_limited,
        token_requests: s.token_requests,
        wall_ms: u64::try_from(wall.as_millis()).unwrap_or(u64::MAX),
        server: s,
    })
}
