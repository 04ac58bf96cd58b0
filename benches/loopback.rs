//! End to end on loopback: calls per second at 64 concurrent callers, and the time of one call
//! alone, for bare hyper-util and for the sturdy stack over it, in one run, with rounds in
//! rotating order so that drift in the machine's speed hits every client alike.
//!
//! cargo bench -p sturdy-benches --bench loopback                 (7 rounds of 20,000 calls)
//! cargo bench -p sturdy-benches --bench loopback -- 3 5000       (rounds, calls per round)
//!
//! The server is a minimal hyper server (200, 2-byte body) on its own one-worker runtime and
//! thread; each client runs on a one-worker runtime of its own. This is not a criterion bench:
//! criterion measures one function at a time, and the comparison asked for here needs the
//! clients interleaved round by round. The output is two markdown tables: medians over the
//! rounds, and each client's figures over bare's in the same round (median and quartiles), which
//! takes the machine's drift between rounds out of the comparison. The sequential figure is the
//! median time of one call in a round.
//!
//! STURDY_LOOPBACK_ONLY=a,b keeps only the clients whose names contain one of the words (bare
//! always stays); STURDY_LOOPBACK_SEQUENTIAL=1 runs the sequential rounds only;
//! STURDY_LOOPBACK_DIST=1 prints each sequential round's mean and percentiles.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sturdy::{Client, ClientBuilder};
use tower::{Service, ServiceExt};

const CONCURRENCY: usize = 64;

fn server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

type Hyper = HyperClient<HttpConnector, Full<Bytes>>;

#[derive(Clone)]
enum Subject {
    Bare(Hyper),
    Sturdy(Client<Incoming>),
    /// The same client, but each caller keeps its own clone and calls it with `ready().call()`
    /// (no clone and no `Oneshot` per call).
    SturdyKept(Client<Incoming>),
    Reqwest(reqwest::Client),
    ReqwestRetry(reqwest_middleware::ClientWithMiddleware),
    TowerTimeout(tower::timeout::Timeout<Hyper>),
}

impl Subject {
    async fn call(&mut self, uri: &str) {
        let req = Request::get(uri).body(Full::default()).unwrap();
        let body = match self {
            Self::Bare(c) => {
                let res = c.request(req).await.unwrap();
                res.into_body().collect().await.unwrap().to_bytes()
            }
            Self::Sturdy(c) => {
                let res = c.clone().oneshot(req).await.unwrap();
                res.into_body().collect().await.unwrap().to_bytes()
            }
            Self::SturdyKept(c) => {
                let res = c.ready().await.unwrap().call(req).await.unwrap();
                res.into_body().collect().await.unwrap().to_bytes()
            }
            Self::TowerTimeout(c) => {
                let res = c.clone().oneshot(req).await.unwrap();
                res.into_body().collect().await.unwrap().to_bytes()
            }
            Self::Reqwest(c) => c.get(uri).send().await.unwrap().bytes().await.unwrap(),
            Self::ReqwestRetry(c) => c.get(uri).send().await.unwrap().bytes().await.unwrap(),
        };
        assert_eq!(&body[..], b"ok");
    }
}

fn hyper_client() -> Hyper {
    HyperClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONCURRENCY)
        .build_http()
}

fn reqwest_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap()
}

/// `ClientBuilder` over hyper-util with the named layers left out (`without_<name>()`): each
/// `without_*` changes the builder's type, so a macro rather than a function.
macro_rules! sturdy_without {
    ($($layer:ident),*) => {
        paste_without!(ClientBuilder::new(), $($layer),*)
    };
}

macro_rules! paste_without {
    ($b:expr, ) => { Subject::Sturdy($b.build(hyper_client())) };
    ($b:expr, idempotency $(, $rest:ident)*) => { paste_without!($b.without_idempotency(), $($rest),*) };
    ($b:expr, retry $(, $rest:ident)*) => { paste_without!($b.without_retry(), $($rest),*) };
    ($b:expr, circuit_breaker $(, $rest:ident)*) => { paste_without!($b.without_circuit_breaker(), $($rest),*) };
    ($b:expr, rate_limit $(, $rest:ident)*) => { paste_without!($b.without_rate_limit(), $($rest),*) };
    ($b:expr, attempt_timeout $(, $rest:ident)*) => { paste_without!($b.without_attempt_timeout(), $($rest),*) };
}

fn subjects() -> Vec<(&'static str, Box<dyn Fn() -> Subject>)> {
    vec![
        (
            "hyper-util client, bare",
            Box::new(|| Subject::Bare(hyper_client())),
        ),
        (
            "sturdy ClientBuilder default stack",
            Box::new(|| Subject::Sturdy(ClientBuilder::new().build(hyper_client()))),
        ),
        (
            "sturdy default stack, kept by each caller",
            Box::new(|| Subject::SturdyKept(ClientBuilder::new().build(hyper_client()))),
        ),
        (
            "sturdy stack without the attempt timeout",
            Box::new(|| {
                Subject::Sturdy(
                    ClientBuilder::new()
                        .without_attempt_timeout()
                        .build(hyper_client()),
                )
            }),
        ),
        (
            "sturdy ClientBuilder, only the attempt timeout",
            Box::new(|| {
                Subject::Sturdy(
                    ClientBuilder::new()
                        .without_idempotency()
                        .without_retry()
                        .without_circuit_breaker()
                        .without_rate_limit()
                        .build(hyper_client()),
                )
            }),
        ),
        (
            "hyper-util + tower's TimeoutLayer (30 s)",
            Box::new(|| {
                Subject::TowerTimeout(tower::timeout::Timeout::new(
                    hyper_client(),
                    std::time::Duration::from_secs(30),
                ))
            }),
        ),
        (
            "reqwest, bare",
            Box::new(|| Subject::Reqwest(reqwest_client())),
        ),
        (
            "reqwest + reqwest-middleware + reqwest-retry",
            Box::new(|| {
                let policy = reqwest_retry::policies::ExponentialBackoff::builder()
                    .build_with_max_retries(3);
                Subject::ReqwestRetry(
                    reqwest_middleware::ClientBuilder::new(reqwest_client())
                        .with(reqwest_retry::RetryTransientMiddleware::new_with_policy(
                            policy,
                        ))
                        .build(),
                )
            }),
        ),
        (
            "sturdy ClientBuilder, only the retry layer",
            Box::new(|| sturdy_without!(idempotency, circuit_breaker, rate_limit, attempt_timeout)),
        ),
        (
            "sturdy ClientBuilder, only the circuit breaker",
            Box::new(|| sturdy_without!(idempotency, retry, rate_limit, attempt_timeout)),
        ),
        (
            "sturdy ClientBuilder, only the rate limit",
            Box::new(|| sturdy_without!(idempotency, retry, circuit_breaker, attempt_timeout)),
        ),
        (
            "sturdy ClientBuilder, only the idempotency key",
            Box::new(|| sturdy_without!(retry, circuit_breaker, rate_limit, attempt_timeout)),
        ),
        (
            "sturdy ClientBuilder, every layer off",
            Box::new(|| {
                Subject::Sturdy(
                    ClientBuilder::new()
                        .without_idempotency()
                        .without_retry()
                        .without_circuit_breaker()
                        .without_rate_limit()
                        .without_attempt_timeout()
                        .build(hyper_client()),
                )
            }),
        ),
    ]
}

/// The CPU time (user and system, nanoseconds) the threads in `tids` have run so far, from the
/// kernel's scheduler statistics (`/proc/self/task/<tid>/schedstat`, first field).
fn cpu_ns(tids: &std::sync::Mutex<Vec<String>>) -> u64 {
    tids.lock()
        .unwrap()
        .iter()
        .filter_map(|tid| std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// One round: `calls` calls by `CONCURRENCY` callers; calls per second, and the client
/// runtime's CPU time per call in microseconds (its threads' time on the CPU, which the
/// machine's scheduling noise moves far less than wall time).
fn concurrent_round(subject: &Subject, uri: &Arc<str>, calls: usize) -> (f64, f64) {
    let tids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start({
            let tids = tids.clone();
            move || {
                if let Some(tid) = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
                {
                    tids.lock().unwrap().push(tid);
                }
            }
        })
        .build()
        .unwrap();
    rt.block_on(async {
        // Warm the pool.
        let warm: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let (mut s, u) = (subject.clone(), uri.clone());
                tokio::spawn(async move { s.call(&u).await })
            })
            .collect();
        for w in warm {
            w.await.unwrap();
        }
        let start = Instant::now();
        let cpu = cpu_ns(&tids);
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|i| {
                let (mut s, u) = (subject.clone(), uri.clone());
                let n = calls / CONCURRENCY + usize::from(i < calls % CONCURRENCY);
                tokio::spawn(async move {
                    for _ in 0..n {
                        s.call(&u).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_ns(&tids) - cpu;
        (calls as f64 / secs, cpu as f64 / 1e3 / calls as f64)
    })
}

/// One round of sequential calls: the median time of one call, in microseconds (the median, not
/// the mean: one call that waits for the scheduler would otherwise move the whole round).
/// With STURDY_LOOPBACK_DIST=1 it also prints the round's mean and percentiles (the times of one
/// call are bimodal on some machines, so the median alone can move more than the mean).
fn sequential_round(name: &str, subject: &Subject, uri: &Arc<str>, calls: usize) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // The caller's own clone, as each concurrent caller has.
    let mut subject = subject.clone();
    rt.block_on(async {
        subject.call(uri).await;
        let mut each = Vec::with_capacity(calls);
        for _ in 0..calls {
            let start = Instant::now();
            subject.call(uri).await;
            each.push(start.elapsed().as_secs_f64() * 1e6);
        }
        if std::env::var_os("STURDY_LOOPBACK_DIST").is_some() {
            let mean = each.iter().sum::<f64>() / each.len() as f64;
            let mut v = each.clone();
            v.sort_by(f64::total_cmp);
            let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
            eprintln!(
                "sequential µs, {name}: mean {mean:.2}, p10 {:.2}, p25 {:.2}, p50 {:.2}, p75 {:.2}, p90 {:.2}, p99 {:.2}",
                at(0.1), at(0.25), at(0.5), at(0.75), at(0.9), at(0.99)
            );
        }
        median(each)
    })
}

/// The median and the interquartile range of `v`.
fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.25), at(0.5), at(0.75))
}

/// Each round's figure over bare's figure in the same round: pairing the rounds takes the
/// machine's drift between rounds out of the comparison.
fn paired(of: &[f64], base: &[f64]) -> (f64, f64, f64) {
    quartiles(of.iter().zip(base).map(|(a, b)| a / b).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; the optional numbers are rounds and calls per round.
    let nums: Vec<usize> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let rounds = nums.first().copied().unwrap_or(7);
    let calls = nums.get(1).copied().unwrap_or(20_000);
    let addr = server();
    let uri: Arc<str> = format!("http://{addr}/").into();
    // STURDY_LOOPBACK_ONLY=a,b keeps the clients whose names contain one of the words (the bare
    // client, the baseline, always stays).
    let only = std::env::var("STURDY_LOOPBACK_ONLY").ok();
    let subjects: Vec<_> = subjects()
        .into_iter()
        .enumerate()
        .filter(|(i, (name, _))| {
            *i == 0
                || only
                    .as_deref()
                    .is_none_or(|o| o.split(',').any(|w| name.contains(w.trim())))
        })
        .map(|(_, s)| s)
        .collect();
    // STURDY_LOOPBACK_SEQUENTIAL=1 runs the sequential rounds only (the concurrent columns then
    // read 1), for profiling one call at a time.
    let sequential_only = std::env::var_os("STURDY_LOOPBACK_SEQUENTIAL").is_some();
    let made: Vec<Subject> = subjects.iter().map(|(_, f)| f()).collect();
    let mut tput = vec![Vec::new(); made.len()];
    let mut seq = vec![Vec::new(); made.len()];
    let mut cpu = vec![Vec::new(); made.len()];
    for r in 0..rounds {
        // Rotate the order every round.
        for k in 0..made.len() {
            let i = (r + k) % made.len();
            let (t, c) = if sequential_only {
                (1.0, 1.0)
            } else {
                concurrent_round(&made[i], &uri, calls)
            };
            tput[i].push(t);
            cpu[i].push(c);
            seq[i].push(sequential_round(subjects[i].0, &made[i], &uri, calls / 10));
        }
        eprintln!("round {} of {rounds} done", r + 1);
    }
    let base_t = median(tput[0].clone());
    let base_s = median(seq[0].clone());
    let base_c = median(cpu[0].clone());
    println!(
        "| client | calls/s at {CONCURRENCY} concurrent | vs bare | client CPU µs per call | vs bare | µs per sequential call | vs bare |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (i, (name, _)) in subjects.iter().enumerate() {
        let t = median(tput[i].clone());
        let s = median(seq[i].clone());
        let c = median(cpu[i].clone());
        println!(
            "| {name} | {t:.0} | {:+.1} % | {c:.2} | {:+.1} % | {s:.1} | {:+.1} % |",
            (t / base_t - 1.0) * 100.0,
            (c / base_c - 1.0) * 100.0,
            (s / base_s - 1.0) * 100.0
        );
    }
    // The same comparison round by round: each round's figure over bare's in that round, as the
    // median of the rounds with the interquartile range beside it.
    println!();
    println!("| client | calls/s over bare's, same round: median [quartiles] | sequential call over bare's, same round: median [quartiles] |");
    println!("|---|---:|---:|");
    let pct = |(lo, mid, hi): (f64, f64, f64)| {
        format!(
            "{:.1} % [{:.1} %, {:.1} %]",
            mid * 100.0,
            lo * 100.0,
            hi * 100.0
        )
    };
    for (i, (name, _)) in subjects.iter().enumerate().skip(1) {
        println!(
            "| {name} | {} | {} |",
            pct(paired(&tput[i], &tput[0])),
            pct(paired(&seq[i], &seq[0]))
        );
    }
}
