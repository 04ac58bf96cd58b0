//! `sturdy-redis-worker`: one app instance that shares a rate-limit quota, an idempotency store
//! and a webhook queue with its peers through Redis. Start several, as several processes of one
//! service would run, and each plays one part:
//!
//! ```text
//! sturdy-redis-worker quota   PREFIX RATE PERIOD_MS BURST CALLS TASKS MAX_WAIT_MS
//! sturdy-redis-worker idem    PREFIX KEYS PROCESSES INDEX
//! sturdy-redis-worker produce STREAM FROM TO
//! sturdy-redis-worker consume STREAM GROUP NAME CLAIM_MS PREFIX EXPECTED
//! sturdy-redis-worker hang    STREAM GROUP NAME CLAIM_MS TAKE
//! ```
//!
//! Redis comes from `STURDY_REDIS_URL` (one server), or `STURDY_REDIS_CLUSTER_URLS` (a cluster,
//! node URLs separated by commas) when `STURDY_WORKER_CLUSTER=1`. Each part connects, says
//! `ready`, and waits for a line on its standard input before it starts, so that several
//! processes start at once; it reports on standard output, one fact per line:
//!
//! - `quota`: `CALLS` calls of `TASKS` concurrent tasks through a `RateLimitLayer` whose quota
//!   (`RATE` calls per `PERIOD_MS`, burst `BURST`) is shared in Redis; a call waits for a slot up to
//!   `MAX_WAIT_MS`. One line `admitted <unix micros>` per call let through, then `done`.
//! - `idem`: the keyed POSTs `0..KEYS` that fall to this process (each key goes to two or three
//!   of the `PROCESSES`, as duplicated deliveries would), through an `IdempotencyLayer` on the
//!   shared store; the handler counts its runs per key in the hash `PREFIX:runs`. A 409 (the
//!   same key running in another process) is asked again 20 ms later. One line `key <k>
//!   <status> <replayed> <body>` per key.
//! - `produce`: enqueues the events `FROM..TO` on the stream; `enqueued <n> duplicate <m>`.
//! - `consume`: takes events from the group and handles each once: counts it in the hash
//!   `PREFIX:handled`, then acknowledges it; `handled <id> <deliveries>` per event; stops once
//!   the hash holds `EXPECTED` events and nothing is left to take.
//! - `hang`: takes `TAKE` events and never acknowledges them (`took <id>` each), then waits to
//!   be killed, as a worker that crashed mid-event.
#![forbid(unsafe_code)]

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy_core::{BoxError, WallClock};
use sturdy_idempotency::server::{ByCredentials, IdempotencyLayer};
use sturdy_ratelimit::{Quota, RateLimitLayer};
use sturdy_redis::{
    RedisConnection, RedisIdempotencyStore, RedisQuota, RedisStreamConsumer, RedisStreamQueue,
};
use sturdy_webhook::{EventQueue, Push, WebhookEvent};
use tower::{service_fn, Layer, ServiceExt};

type Result<T> = std::result::Result<T, BoxError>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(&format!("cannot start a tokio runtime: {e}")),
    };
    // Local tasks: the calls of one process run concurrently on its one thread.
    let local = tokio::task::LocalSet::new();
    if let Err(e) = rt.block_on(local.run_until(run(&args))) {
        fail(&e.to_string());
    }
}

fn fail(message: &str) -> ! {
    eprintln!("sturdy-redis-worker: {message}");
    std::process::exit(1);
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A parent that went away is not this process's problem.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T> {
    args.get(i).and_then(|a| a.parse().ok()).ok_or_else(|| {
        format!(
            "argument {i} ({what}) is missing or invalid: see the usage in the docs of this binary"
        )
        .into()
    })
}

async fn connection() -> Result<RedisConnection> {
    if std::env::var("STURDY_WORKER_CLUSTER").as_deref() == Ok("1") {
        let urls = std::env::var("STURDY_REDIS_CLUSTER_URLS")
            .map_err(|_| "STURDY_REDIS_CLUSTER_URLS is not set")?;
        RedisConnection::connect_cluster(urls.split(',').filter(|u| !u.is_empty())).await
    } else {
        let url = std::env::var("STURDY_REDIS_URL").map_err(|_| "STURDY_REDIS_URL is not set")?;
        RedisConnection::connect(&url).await
    }
}

/// Waits for the go line on standard input.
fn wait_for_go() {
    say("ready");
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

fn unix_micros() -> u128 {
    WallClock::now(&sturdy_core::SystemClock)
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

async fn run(args: &[String]) -> Result<()> {
    let role = args.first().map(String::as_str).unwrap_or_default();
    let conn = connection().await?;
    match role {
        "quota" => quota(conn, args).await,
        "idem" => idem(conn, args).await,
        "produce" => produce(conn, args).await,
        "consume" => consume(conn, args).await,
        "hang" => hang(conn, args).await,
        other => {
            Err(format!("unknown part {other:?}: quota, idem, produce, consume or hang").into())
        }
    }
}

async fn quota(conn: RedisConnection, args: &[String]) -> Result<()> {
    let prefix: String = arg(args, 1, "PREFIX")?;
    let rate: u32 = arg(args, 2, "RATE")?;
    let period = Duration::from_millis(arg(args, 3, "PERIOD_MS")?);
    let burst: u32 = arg(args, 4, "BURST")?;
    let calls: usize = arg(args, 5, "CALLS")?;
    let tasks = arg::<usize>(args, 6, "TASKS")?.max(1);
    let max_wait = Duration::from_millis(arg(args, 7, "MAX_WAIT_MS")?);
    let quota = Quota::new(rate, period)?.with_burst(burst)?;
    let remote = RedisQuota::new(conn, quota).with_prefix(prefix);
    let svc = RateLimitLayer::new(quota)
        .with_remote(Arc::new(remote))
        .with_max_wait(max_wait)
        .layer(service_fn(|_r: Request<()>| async {
            say(&format!("admitted {}", unix_micros()));
            Ok::<_, BoxError>(Response::new(()))
        }));
    wait_for_go();
    let mut running = Vec::new();
    for t in 0..tasks {
        let svc = svc.clone();
        let share = calls / tasks + usize::from(t < calls % tasks);
        running.push(tokio::task::spawn_local(async move {
            for _ in 0..share {
                let req = Request::get("http://api.example.com/").body(())?;
                // A refusal (no slot within the wait) is expected; anything else is not.
                if let Err(e) = svc.clone().oneshot(req).await {
                    if !e.is::<sturdy_core::RateLimited>() {
                        return Err(e);
                    }
                }
            }
            Ok::<_, BoxError>(())
        }));
    }
    for r in running {
        r.await??;
    }
    say("done");
    Ok(())
}

/// Whether process `index` of `processes` receives key `k`: two processes receive each key, and
/// every tenth key a third.
fn receives(k: usize, processes: usize, index: usize) -> bool {
    let first = k % processes;
    let picks = if k.is_multiple_of(10) { 3 } else { 2 };
    (0..picks.min(processes)).any(|i| (first + i) % processes == index)
}

async fn idem(conn: RedisConnection, args: &[String]) -> Result<()> {
    let prefix: String = arg(args, 1, "PREFIX")?;
    let keys: usize = arg(args, 2, "KEYS")?;
    let processes: usize = arg(args, 3, "PROCESSES")?;
    let index: usize = arg(args, 4, "INDEX")?;
    let runs = format!("{prefix}:runs");
    let store = RedisIdempotencyStore::new(conn.clone()).with_prefix(format!("{prefix}:idem"));
    let pid = std::process::id();
    let handler = service_fn(move |req: Request<Full<Bytes>>| {
        let (mut conn, runs) = (conn.clone(), runs.clone());
        async move {
            let key = req
                .headers()
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            // The side effect whose count must be one per key, whoever received it.
            redis::cmd("HINCRBY")
                .arg(&runs)
                .arg(&key)
                .arg(1)
                .query_async::<i64>(&mut conn)
                .await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
            let body = format!("{{\"order\":\"{key}\",\"by\":{pid}}}");
            Ok::<_, BoxError>(
                Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Full::new(Bytes::from(body)))?,
            )
        }
    });
    let app = IdempotencyLayer::new(store, ByCredentials::default()).layer(handler);
    let mine: Vec<usize> = (0..keys)
        .filter(|k| receives(*k, processes, index))
        .collect();
    wait_for_go();
    let mut running = Vec::new();
    for chunk in mine.chunks(mine.len().div_ceil(16).max(1)) {
        let (app, chunk) = (app.clone(), chunk.to_vec());
        running.push(tokio::task::spawn_local(async move {
            for k in chunk {
                let key = format!("order-{k}");
                loop {
                    let req = Request::post("/orders")
                        .header("idempotency-key", &key)
                        .body(Full::new(Bytes::from(format!("{{\"order\":{k}}}"))))?;
                    let res = app.clone().oneshot(req).await?;
                    let status = res.status();
                    let replayed = res.headers().contains_key("idempotent-replayed");
                    let body = res.into_body().collect().await?.to_bytes();
                    if status == StatusCode::CONFLICT {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    say(&format!(
                        "key {key} {} {replayed} {}",
                        status.as_u16(),
                        String::from_utf8_lossy(&body)
                    ));
                    break;
                }
            }
            Ok::<_, BoxError>(())
        }));
    }
    for r in running {
        r.await??;
    }
    say("done");
    Ok(())
}

fn event(i: u64) -> WebhookEvent {
    WebhookEvent::new(
        "standard",
        format!("evt_{i}"),
        Bytes::from(format!("{{\"n\":{i}}}")),
    )
}

async fn produce(conn: RedisConnection, args: &[String]) -> Result<()> {
    let stream: String = arg(args, 1, "STREAM")?;
    let from: u64 = arg(args, 2, "FROM")?;
    let to: u64 = arg(args, 3, "TO")?;
    let queue = RedisStreamQueue::new(conn, stream)?;
    wait_for_go();
    let (mut enqueued, mut duplicate) = (0, 0);
    for i in from..to {
        match queue.push(event(i), Duration::from_secs(600)).await? {
            Push::Enqueued => enqueued += 1,
            Push::Duplicate => duplicate += 1,
            Push::Full => return Err("the stream is full".into()),
        }
    }
    say(&format!("enqueued {enqueued} duplicate {duplicate}"));
    Ok(())
}

async fn consume(conn: RedisConnection, args: &[String]) -> Result<()> {
    let stream: String = arg(args, 1, "STREAM")?;
    let group: String = arg(args, 2, "GROUP")?;
    let name: String = arg(args, 3, "NAME")?;
    let claim = Duration::from_millis(arg(args, 4, "CLAIM_MS")?);
    let prefix: String = arg(args, 5, "PREFIX")?;
    let expected: usize = arg(args, 6, "EXPECTED")?;
    let handled = format!("{prefix}:handled");
    let mut counter = conn.clone();
    let mut worker = RedisStreamConsumer::join(conn, stream, group, name, claim)
        .await?
        .with_wait(Duration::from_millis(50));
    wait_for_go();
    loop {
        match worker.next().await? {
            Some(d) => {
                redis::cmd("HINCRBY")
                    .arg(&handled)
                    .arg(&d.event.id)
                    .arg(1)
                    .query_async::<i64>(&mut counter)
                    .await?;
                worker.ack(&d).await?;
                say(&format!("handled {} {}", d.event.id, d.deliveries));
            }
            None => {
                let n: usize = redis::cmd("HLEN")
                    .arg(&handled)
                    .query_async(&mut counter)
                    .await?;
                if n >= expected {
                    say("done");
                    return Ok(());
                }
            }
        }
    }
}

async fn hang(conn: RedisConnection, args: &[String]) -> Result<()> {
    let stream: String = arg(args, 1, "STREAM")?;
    let group: String = arg(args, 2, "GROUP")?;
    let name: String = arg(args, 3, "NAME")?;
    let claim = Duration::from_millis(arg(args, 4, "CLAIM_MS")?);
    let take: usize = arg(args, 5, "TAKE")?;
    let mut worker = RedisStreamConsumer::join(conn, stream, group, name, claim)
        .await?
        .with_wait(Duration::from_millis(50));
    wait_for_go();
    let mut taken = 0;
    while taken < take {
        if let Some(d) = worker.next().await? {
            say(&format!("took {}", d.event.id));
            taken += 1;
        }
    }
    say("hanging");
    // Killed from outside, as a worker that crashed mid-event.
    std::future::pending::<()>().await;
    Ok(())
}
