//! The "Exponential Backoff And Jitter" experiment (Marc Brooker, AWS Architecture Blog, 2015),
//! on real sockets: N clients each increment one counter once, under optimistic concurrency.
//! A client reads the counter (`GET /counter`, which answers the value and its version as an
//! `ETag`), then writes the value plus one with `If-Match: "<version>"`. When another client wrote
//! in between, the write gets 412; the client sleeps as its strategy says, reads again and tries
//! again. Each strategy and each N runs against a fresh server; the server counts the calls.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use sturdy::retry::Backoff;
use sturdy_chaos::{http_client, ChaosServer, Knobs};
use tokio::sync::Barrier;
use tokio::time::Instant;

use super::args::JitterArgs;
use super::plot;
use super::progress::Progress;
use super::DemoError;

/// How a client waits after a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// Read and write again at once.
    NoBackoff,
    /// `min(cap, base * 2^attempt)`: sturdy's `Backoff::Exponential`.
    Exponential,
    /// `random_between(0, min(cap, base * 2^attempt))`: sturdy's `Backoff::FullJitter`.
    FullJitter,
    /// `temp / 2 + random_between(0, temp / 2)` with `temp = min(cap, base * 2^attempt)`.
    EqualJitter,
    /// `min(cap, random_between(base, previous sleep * 3))`: sturdy's
    /// `Backoff::DecorrelatedJitter`.
    Decorrelated,
}

impl Strategy {
    pub(crate) const ALL: [Self; 5] = [
        Self::NoBackoff,
        Self::Exponential,
        Self::FullJitter,
        Self::EqualJitter,
        Self::Decorrelated,
    ];

    /// The name in tables and plot legends.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::NoBackoff => "no backoff",
            Self::Exponential => "exponential",
            Self::FullJitter => "full jitter",
            Self::EqualJitter => "equal jitter",
            Self::Decorrelated => "decorrelated jitter",
        }
    }

    /// The name in JSON.
    fn id(self) -> &'static str {
        match self {
            Self::NoBackoff => "no_backoff",
            Self::Exponential => "exponential",
            Self::FullJitter => "full_jitter",
            Self::EqualJitter => "equal_jitter",
            Self::Decorrelated => "decorrelated_jitter",
        }
    }
}

/// A strategy with its parameters: turns a retry number and a random draw into a sleep.
#[derive(Debug, Clone, Copy)]
struct Sleeper {
    strategy: Strategy,
    exponential: Backoff,
    full_jitter: Backoff,
    decorrelated: Backoff,
}

impl Sleeper {
    fn new(strategy: Strategy, base: Duration, cap: Duration) -> Result<Self, DemoError> {
        Ok(Self {
            strategy,
            exponential: Backoff::exponential(base, cap)?,
            full_jitter: Backoff::full_jitter(base, cap)?,
            decorrelated: Backoff::decorrelated_jitter(base, cap)?,
        })
    }

    /// The sleep before retry `retry` (1 for the first; `attempt = retry - 1` in the formulas).
    fn delay(&self, retry: u32, prev: Option<Duration>, rng: &mut SmallRng) -> Duration {
        match self.strategy {
            Strategy::NoBackoff => Duration::ZERO,
            Strategy::Exponential => self.exponential.delay(retry, prev, 0),
            Strategy::FullJitter => self.full_jitter.delay(retry, prev, rng.random()),
            Strategy::Decorrelated => self.decorrelated.delay(retry, prev, rng.random()),
            Strategy::EqualJitter => {
                // temp = min(cap, base * 2^attempt), the exponential curve.
                let temp = self.exponential.delay(retry, None, 0);
                let half = temp / 2;
                let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
                half + Duration::from_nanos(rng.random_range(0..=nanos))
            }
        }
    }
}

/// One strategy at one N, one repetition.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Run {
    /// The strategy's JSON name.
    pub(crate) strategy: &'static str,
    /// Contending clients.
    pub(crate) clients: usize,
    /// The seed of this repetition's draws.
    pub(crate) seed: u64,
    /// Every call the counter answered: reads and writes, conflicts included.
    pub(crate) calls: u64,
    /// Reads.
    pub(crate) reads: u64,
    /// Writes refused with 412.
    pub(crate) conflicts: u64,
    /// From the common start until the last client had written, in milliseconds.
    pub(crate) time_ms: u64,
    /// The most conflicts one client met.
    pub(crate) max_conflicts: u32,
    #[serde(skip)]
    pub(crate) kind: Strategy,
}

/// One strategy at one N: the mean over the repetitions.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Point {
    /// The strategy's JSON name.
    pub(crate) strategy: &'static str,
    /// Contending clients.
    pub(crate) clients: usize,
    /// Mean calls.
    pub(crate) calls: u64,
    /// Mean completion time, in milliseconds.
    pub(crate) time_ms: u64,
    /// The fewest and the most calls of one repetition.
    pub(crate) calls_range: [u64; 2],
    #[serde(skip)]
    pub(crate) kind: Strategy,
}

impl Point {
    fn of(runs: &[&Run]) -> Option<Self> {
        let first = runs.first()?;
        let k = runs.len() as u64;
        let mean = |f: fn(&Run) -> u64| (runs.iter().map(|r| f(r)).sum::<u64>() + k / 2) / k;
        Some(Self {
            strategy: first.strategy,
            clients: first.clients,
            calls: mean(|r| r.calls),
            time_ms: mean(|r| r.time_ms),
            calls_range: [
                runs.iter().map(|r| r.calls).min().unwrap_or(0),
                runs.iter().map(|r| r.calls).max().unwrap_or(0),
            ],
            kind: first.kind,
        })
    }
}

/// The `--json` output.
#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    seed: u64,
    base_ms: u64,
    cap_ms: u64,
    latency_ms: u64,
    latency_jitter_ms: u64,
    repetitions: u32,
    clients: &'a [usize],
    points: &'a [Point],
    runs: &'a [Run],
}

/// A client gives up after this many conflicts (none does in the default runs).
const MAX_CONFLICTS: u32 = 100_000;
/// A run that takes longer than this is stopped and reported as an error.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

type Http = Client<HttpConnector, Full<Bytes>>;

/// Runs the experiment, prints the results and writes the plots.
/// An error writing the plots, naming the `--out` directory.
fn out_error(dir: &std::path::Path, e: &dyn std::fmt::Display) -> DemoError {
    format!("--out {}: {e}", dir.display()).into()
}

pub(crate) async fn main(args: &JitterArgs) -> Result<(), DemoError> {
    // A directory for the plots that cannot be made says so before the runs, naming it.
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|e| out_error(dir, &e))?;
    }
    // The tables come at the end, so every N gets its summary line on stderr.
    let mut progress = Progress::new(false);
    let mut runs = Vec::new();
    let mut points = Vec::new();
    for &n in &args.clients {
        let started = Instant::now();
        let first = runs.len();
        for rep in 0..args.runs {
            for (i, strategy) in Strategy::ALL.into_iter().enumerate() {
                progress.update(&format!(
                    "{n} clients, run {}/{}: {} ({}/{})",
                    rep + 1,
                    args.runs,
                    strategy.name(),
                    i + 1,
                    Strategy::ALL.len()
                ));
                let seed = args.seed.wrapping_add(u64::from(rep));
                runs.push(run(strategy, n, seed, args).await?);
            }
        }
        let mut summary = Vec::new();
        for strategy in Strategy::ALL {
            let these: Vec<&Run> = runs[first..]
                .iter()
                .filter(|r| r.kind == strategy)
                .collect();
            if let Some(p) = Point::of(&these) {
                summary.push(format!("{} {}", strategy.name(), p.calls));
                points.push(p);
            }
        }
        progress.finish(&format!(
            "{n} clients: {} runs in {:.1} s; calls: {}",
            runs.len() - first,
            started.elapsed().as_secs_f64(),
            summary.join(", ")
        ));
    }
    if let Some(dir) = &args.out {
        let written = plot::write(dir, &points, args).map_err(|e| out_error(dir, &*e))?;
        for (path, what) in written {
            let shown = path.canonicalize().unwrap_or(path);
            eprintln!("wrote {} ({what})", shown.display());
        }
    }
    if args.json {
        let out = JsonReport {
            seed: args.seed,
            base_ms: millis(args.base),
            cap_ms: millis(args.cap),
            latency_ms: millis(args.latency),
            latency_jitter_ms: millis(args.latency_jitter),
            repetitions: args.runs,
            clients: &args.clients,
            points: &points,
            runs: &runs,
        };
        say!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_tables(&points, args);
    }
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn print_tables(points: &[Point], args: &JitterArgs) {
    say!(
        "N clients each increment one counter once: read it, write it with If-Match; a stale write"
    );
    say!(
        "gets 412 and the client sleeps, reads and tries again. Backoff base {} ms, cap {} ms; the",
        millis(args.base),
        millis(args.cap)
    );
    let extra = if args.latency_jitter.is_zero() {
        String::new()
    } else {
        format!(" plus up to {} ms", millis(args.latency_jitter))
    };
    let runs = if args.runs == 1 {
        "one run".to_owned()
    } else {
        format!("the mean of {} runs", args.runs)
    };
    say!(
        "server takes {} ms{extra} per request. Seed {}; each figure is {runs}.",
        millis(args.latency),
        args.seed
    );
    let header = {
        let mut h = format!("{:>7}", "clients");
        for s in Strategy::ALL {
            h.push_str(&format!(" {:>19}", s.name()));
        }
        h
    };
    let tables: [(&str, fn(&Point) -> u64); 2] = [
        (
            "calls (reads and writes) until every client has written",
            |p| p.calls,
        ),
        ("completion time (ms) until every client has written", |p| {
            p.time_ms
        }),
    ];
    for (title, value) in tables {
        say!("\n{title}\n{header}");
        for &n in &args.clients {
            let mut line = format!("{n:>7}");
            for s in Strategy::ALL {
                if let Some(p) = points.iter().find(|p| p.kind == s && p.clients == n) {
                    line.push_str(&format!(" {:>19}", value(p)));
                }
            }
            say!("{line}");
        }
    }
}

/// One strategy with `n` clients against a fresh server.
async fn run(strategy: Strategy, n: usize, seed: u64, args: &JitterArgs) -> Result<Run, DemoError> {
    let server = ChaosServer::start(Knobs {
        counter_latency: args.latency,
        counter_latency_jitter: args.latency_jitter,
        seed,
        ..Knobs::default()
    })
    .await?;
    let url = server.url("/counter");
    let http = http_client();
    let sleeper = Sleeper::new(strategy, args.base, args.cap)?;
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        // One generator per client, seeded from the run's seed, N and the client's index.
        let rng = SmallRng::seed_from_u64(
            seed ^ ((n as u64) << 32) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let (http, url, barrier) = (http.clone(), url.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            contend(&http, &url, sleeper, rng).await
        });
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut max_conflicts = 0;
    let mut last = started;
    let joined = tokio::time::timeout(RUN_DEADLINE, async {
        while let Some(joined) = tasks.join_next().await {
            let (conflicts, finished) = joined??;
            max_conflicts = max_conflicts.max(conflicts);
            last = last.max(finished);
        }
        Ok::<_, DemoError>(())
    })
    .await;
    match joined {
        Ok(r) => r?,
        Err(_) => {
            return Err(format!(
                "{} with {n} clients did not finish within {} s",
                strategy.name(),
                RUN_DEADLINE.as_secs()
            )
            .into())
        }
    }
    let c = server.counter();
    if c.value != i64::try_from(n)? || c.writes != n as u64 {
        return Err(format!(
            "{} with {n} clients: the counter reads {} after {} writes; expected {n}",
            strategy.name(),
            c.value,
            c.writes
        )
        .into());
    }
    Ok(Run {
        strategy: strategy.id(),
        clients: n,
        seed,
        calls: c.calls(),
        reads: c.reads,
        conflicts: c.conflicts,
        time_ms: millis(last.duration_since(started)),
        max_conflicts,
        kind: strategy,
    })
}

/// One client: read, write with `If-Match`, and on 412 sleep and start again. Returns its number
/// of conflicts and when it wrote.
async fn contend(
    http: &Http,
    url: &str,
    sleeper: Sleeper,
    mut rng: SmallRng,
) -> Result<(u32, Instant), DemoError> {
    let mut conflicts = 0u32;
    let mut prev = None;
    loop {
        let res = http
            .request(Request::get(url).body(Full::default())?)
            .await?;
        if res.status() != StatusCode::OK {
            return Err(format!("GET /counter answered {}", res.status()).into());
        }
        let etag = res
            .headers()
            .get(header::ETAG)
            .cloned()
            .ok_or("GET /counter answered no ETag")?;
        let body = res.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice::<serde_json::Value>(&body)?
            .get("value")
            .and_then(serde_json::Value::as_i64)
            .ok_or("GET /counter answered no integer value")?;
        let write = Request::put(url)
            .header(header::IF_MATCH, etag)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::from(format!(r#"{{"value":{}}}"#, value + 1)))?;
        let res = http.request(write).await?;
        let status = res.status();
        // Drain the body so the connection goes back to the pool.
        let _ = res.into_body().collect().await?;
        match status {
            StatusCode::OK => return Ok((conflicts, Instant::now())),
            StatusCode::PRECONDITION_FAILED => {
                conflicts += 1;
                if conflicts >= MAX_CONFLICTS {
                    return Err(format!("a client met {MAX_CONFLICTS} conflicts").into());
                }
                let sleep = sleeper.delay(conflicts, prev, &mut rng);
                prev = Some(sleep);
                if !sleep.is_zero() {
                    tokio::time::sleep(sleep).await;
                }
            }
            other => return Err(format!("PUT /counter answered {other}").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn each_strategy_follows_its_formula() {
        let mut rng = SmallRng::seed_from_u64(1);
        let make = |s| Sleeper::new(s, MS * 4, MS * 100).unwrap();
        for retry in 1..=12 {
            let temp = (MS * 4 * 2u32.pow(retry - 1)).min(MS * 100);
            assert_eq!(
                make(Strategy::NoBackoff).delay(retry, None, &mut rng),
                Duration::ZERO
            );
            assert_eq!(
                make(Strategy::Exponential).delay(retry, None, &mut rng),
                temp
            );
            for _ in 0..200 {
                let full = make(Strategy::FullJitter).delay(retry, None, &mut rng);
                assert!(full <= temp, "{full:?} > {temp:?}");
                let equal = make(Strategy::EqualJitter).delay(retry, None, &mut rng);
                assert!(equal >= temp / 2 && equal <= temp, "{equal:?} vs {temp:?}");
                let prev = Some(MS * 20);
                let dec = make(Strategy::Decorrelated).delay(retry, prev, &mut rng);
                assert!(dec >= MS * 4 && dec <= MS * 60, "{dec:?}");
            }
        }
    }

    #[test]
    fn equal_jitter_spreads_over_the_upper_half() {
        let s = Sleeper::new(Strategy::EqualJitter, MS * 10, MS * 1_000).unwrap();
        let mut rng = SmallRng::seed_from_u64(7);
        let draws: Vec<Duration> = (0..1_000).map(|_| s.delay(3, None, &mut rng)).collect();
        // temp = 40 ms: draws cover [20 ms, 40 ms], with a mean near 30 ms.
        assert!(draws.iter().any(|d| *d < MS * 22));
        assert!(draws.iter().any(|d| *d > MS * 38));
        let mean = draws.iter().sum::<Duration>() / 1_000;
        assert!(mean > MS * 29 && mean < MS * 31, "{mean:?}");
    }

    #[test]
    fn the_same_seed_draws_the_same_sleeps() {
        let s = Sleeper::new(Strategy::FullJitter, MS, MS * 100).unwrap();
        let draw = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (1..10)
                .map(|r| s.delay(r, None, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }
}
