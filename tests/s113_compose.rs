//! Outside round s113: composition and cancellation of the whole stack.
//!
//! `ClientBuilder` with every layer on (auth, retry, rate limit, adaptive concurrency, breaker,
//! client idempotency, hedging, coalescing, version pinning) around an in-process `service_fn`,
//! composed with tower's own layers (`Buffer` 1 and 1,024, `ConcurrencyLimit(1)`, `LoadShed`,
//! `Timeout`, `RateLimit`, `BoxCloneSyncService`, `ServiceBuilder`) and driven as a kept service
//! from 1 and 64 tasks; calls dropped at every await a user can reach (a token fetch, a retry
//! backoff, a rate slot, a concurrency permit, a half-open probe, a hedge in flight, a coalesced
//! call) and what is shared checked afterwards; what a deadline ending in each of those waits
//! says (`NotSent` before any send, `MaybeProcessed` after one); and the server side (the
//! idempotency layer and the webhook receiver) under tower-http's `TimeoutLayer` and with
//! clients that go away.
#![cfg(feature = "full")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::circuit::{CircuitBreakerLayer, CircuitHandle, CircuitState};
use sturdy::coalesce::{CoalesceHandle, CoalesceLayer};
use sturdy::concurrency::{AdaptiveConcurrencyLayer, ConcurrencyHandle};
use sturdy::core::{BoxError, CallOptions, CircuitOpen, RateLimited};
use sturdy::hedge::{HedgeHandle, HedgeLayer};
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::ratelimit::{Quota, RateLimitHandle, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::version::VersionLayer;
use sturdy::{Client, ClientBuilder};
use tokio::sync::Semaphore;
use tokio::time::{advance, timeout};
use tower::buffer::Buffer;
use tower::limit::ConcurrencyLimitLayer;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

const HOST: &str = "api.example.com";
const BOUND: Duration = Duration::from_secs(120);

fn get(path: &str) -> Req {
    Request::get(format!("http://{HOST}{path}"))
        .body(Full::default())
        .unwrap()
}

fn post(path: &str) -> Req {
    Request::post(format!("http://{HOST}{path}"))
        .body(Full::from(r#"{"item":"book"}"#))
        .unwrap()
}

/// What the upstream does with one request.
#[derive(Clone)]
enum Step {
    /// Answers this status after this delay, with these headers.
    Answer(u16, Duration, Vec<(&'static str, String)>),
    /// Waits for the gate (a semaphore the test opens), then answers 200.
    Gate(Arc<Semaphore>),
}

fn ok() -> Step {
    Step::Answer(200, Duration::from_millis(5), vec![])
}

/// Counts of what the upstream saw.
#[derive(Default)]
struct Seen {
    /// Requests per path (query included).
    calls: Mutex<HashMap<String, usize>>,
    /// Request futures alive now.
    active: AtomicUsize,
    /// Authorization headers seen.
    auth: Mutex<Vec<String>>,
    /// Idempotency keys seen, per path.
    keys: Mutex<Vec<(String, String)>>,
}

impl Seen {
    fn calls(&self, path: &str) -> usize {
        *self.calls.lock().unwrap().get(path).unwrap_or(&0)
    }
    fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
}

struct Active(Arc<Seen>);
impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

type Script = Arc<dyn Fn(&str, usize) -> Step + Send + Sync>;

/// An in-process upstream: `script(path, n)` says what the n-th request (from 1) to `path` gets.
fn upstream(
    script: impl Fn(&str, usize) -> Step + Send + Sync + 'static,
) -> (
    impl Service<
            Req,
            Response = Res,
            Error = Infallible,
            Future = impl Future<Output = Result<Res, Infallible>> + Send,
        > + Clone
        + Send
        + Sync,
    Arc<Seen>,
) {
    let seen = Arc::new(Seen::default());
    let script: Script = Arc::new(script);
    let s = seen.clone();
    let svc = tower::service_fn(move |req: Req| {
        let seen = s.clone();
        let script = script.clone();
        async move {
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default();
            let n = {
                let mut c = seen.calls.lock().unwrap();
                let e = c.entry(path.clone()).or_insert(0);
                *e += 1;
                *e
            };
            if let Some(a) = req.headers().get("authorization") {
                seen.auth
                    .lock()
                    .unwrap()
                    .push(a.to_str().unwrap_or("?").to_owned());
            }
            if let Some(k) = req.headers().get("idempotency-key") {
                seen.keys
                    .lock()
                    .unwrap()
                    .push((path.clone(), k.to_str().unwrap_or("?").to_owned()));
            }
            seen.active.fetch_add(1, Ordering::SeqCst);
            let _guard = Active(seen.clone());
            let (status, headers) = match script(&path, n) {
                Step::Answer(s, d, h) => {
                    tokio::time::sleep(d).await;
                    (s, h)
                }
                Step::Gate(g) => {
                    let _p = g.acquire().await.unwrap();
                    (200, vec![])
                }
            };
            let mut b = Response::builder().status(status);
            for (k, v) in headers {
                b = b.header(k, v);
            }
            Ok::<_, Infallible>(b.body(Full::from(format!("{path}#{n}"))).unwrap())
        }
    });
    (svc, seen)
}

/// A token endpoint that takes one permit of its gate (for good) before each answer, and counts
/// requests.
fn token_endpoint(
    gate: Arc<Semaphore>,
) -> (
    impl Service<
            Req,
            Response = Res,
            Error = Infallible,
            Future = impl Future<Output = Result<Res, Infallible>> + Send,
        > + Clone
        + Send
        + Sync,
    Arc<AtomicUsize>,
) {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let svc = tower::service_fn(move |_req: Req| {
        let gate = gate.clone();
        let c = c.clone();
        async move {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            gate.acquire().await.unwrap().forget();
            Ok::<_, Infallible>(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Full::from(format!(
                        r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":3600}}"#
                    )))
                    .unwrap(),
            )
        }
    });
    (svc, count)
}

struct Handles {
    limits: RateLimitHandle,
    circuit: CircuitHandle,
    conc: ConcurrencyHandle,
    hedge: HedgeHandle,
    coalesce: CoalesceHandle,
}

/// The settings a test varies.
struct Opts {
    quota: Option<Quota>,
    limit: usize,
    auth: AuthLayer,
    breaker: CircuitBreakerLayer,
    hedge_min_samples: u64,
    /// Adaptive limits (min, max); the initial limit is `limit`. Default: `limit` both.
    bounds: Option<(usize, usize)>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            quota: None,
            limit: 1_000,
            auth: AuthLayer::bearer("static-token").unwrap(),
            breaker: CircuitBreakerLayer::new(),
            hedge_min_samples: 1_000_000,
            bounds: None,
        }
    }
}

type Body = sturdy::coalesce::ResponseBody<Full<Bytes>>;

/// `ClientBuilder` with every option on, around `http`.
fn full_client<S>(http: S, o: Opts) -> (Client<Body>, Handles)
where
    S: Service<Req, Response = Res> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let rl = match o.quota {
        Some(q) => RateLimitLayer::new(q),
        None => RateLimitLayer::adaptive_only(),
    };
    let (rl, limits) = rl.pair();
    let (cb, circuit) = o.breaker.pair();
    let (ac, conc) = AdaptiveConcurrencyLayer::new()
        .with_limits(
            o.bounds.map_or(o.limit, |b| b.0),
            o.bounds.map_or(o.limit, |b| b.1),
        )
        .with_initial_limit(o.limit)
        .pair();
    let (hl, hedge) = HedgeLayer::new()
        .with_min_samples(o.hedge_min_samples)
        .with_delay_bounds(Duration::from_millis(20), Duration::from_millis(20))
        .pair();
    let (co, coalesce) = CoalesceLayer::new().pair();
    let client = ClientBuilder::new()
        .with_idempotency(IdempotencyKeyLayer::new())
        .with_retry(RetryLayer::new().with_seed(113))
        .with_hedge(hl)
        .with_circuit_breaker(cb)
        .with_rate_limit(rl)
        .with_adaptive_concurrency(ac)
        .with_auth(o.auth)
        .with_version(VersionLayer::header("api-version", "2024-06-01").unwrap())
        .with_coalesce(co)
        .with_attempt_timeout(Duration::from_secs(10))
        .build(http);
    (
        client,
        Handles {
            limits,
            circuit,
            conc,
            hedge,
            coalesce,
        },
    )
}

fn in_flight(h: &ConcurrencyHandle) -> usize {
    h.state(HOST).map(|s| s.in_flight()).unwrap_or(0)
}

fn waiting(h: &ConcurrencyHandle) -> usize {
    h.state(HOST).map(|s| s.waiting()).unwrap_or(0)
}

/// Lets spawned tasks run (paused time: no clock moves).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

async fn text(res: Response<Body>) -> String {
    let b = timeout(BOUND, res.into_body().collect())
        .await
        .expect("body hung")
        .expect("body failed")
        .to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>(_: &T) {}
fn assert_send<T: Send>(_: &T) {}

// ------------------------------------------------------------------------------------------
// Composition: every option on, under tower's layers, kept services from 1 and 64 tasks.
// ------------------------------------------------------------------------------------------

/// README: "The client is `Clone + Send + Sync` ... can sit under a `Buffer` or over a
/// `ConcurrencyLimit`, driven by `oneshot` or a kept `ready().await?.call(req)`."
#[tokio::test(start_paused = true)]
async fn every_option_on_is_clone_send_sync_and_its_futures_are_send() {
    let (http, _seen) = upstream(|_, _| ok());
    let (client, _h) = full_client(http, Opts::default());
    assert_send_sync_clone(&client);
    let mut c = client.clone();
    let fut = c.ready().await.unwrap().call(get("/a"));
    assert_send(&fut);
    let res = timeout(BOUND, fut).await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Over a hyper-util client as well (only built, never called: no socket).
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let (co, _) = CoalesceLayer::new().pair();
    let over_hyper = ClientBuilder::new()
        .with_hedge(HedgeLayer::new())
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_auth(AuthLayer::bearer("t").unwrap())
        .with_version(VersionLayer::header("api-version", "1").unwrap())
        .with_coalesce(co)
        .build(hyper);
    assert_send_sync_clone(&over_hyper);
    let mut k = over_hyper.clone();
    let f = k.call(get("/never-polled"));
    assert_send(&f);
    drop(f);
    // Under tower's layers too.
    let buffered = Buffer::new(client.clone(), 1);
    assert_send_sync_clone(&buffered);
    let boxed: BoxCloneSyncService<Req, Response<Body>, BoxError> = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .timeout(Duration::from_secs(30))
            .concurrency_limit(4)
            .service(client),
    );
    assert_send_sync_clone(&boxed);
}

/// Drives `svc` as a kept service from `tasks` tasks, `calls` calls each, mixing GETs (some
/// identical, so coalesced) and POSTs (keyed); returns the statuses seen.
async fn drive<S>(svc: S, tasks: usize, calls: usize) -> Vec<Result<u16, String>>
where
    S: Service<Req, Response = Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError> + Send,
    S::Future: Send,
{
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let mut svc = svc.clone();
        set.spawn(async move {
            let mut out = Vec::new();
            for i in 0..calls {
                let req = match i % 3 {
                    0 => get("/shared"),
                    1 => get(&format!("/t{t}/{i}")),
                    _ => post(&format!("/orders/{t}/{i}")),
                };
                let r = match svc.ready().await {
                    Ok(ready) => ready.call(req).await,
                    Err(e) => Err(e),
                };
                out.push(match r {
                    Ok(res) => Ok(res.status().as_u16()),
                    Err(e) => Err(e.into().to_string()),
                });
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.unwrap());
    }
    all
}

fn flaky(path: &str, n: usize) -> Step {
    // The first request to each order path gets a 503: the keyed POST is retried.
    if path.starts_with("/orders") && n == 1 {
        Step::Answer(503, Duration::from_millis(3), vec![])
    } else {
        Step::Answer(200, Duration::from_millis(3), vec![])
    }
}

#[tokio::test(start_paused = true)]
async fn every_option_on_kept_under_buffer_1_and_1024_from_1_and_64_tasks() {
    for cap in [1usize, 1024] {
        for tasks in [1usize, 64] {
            let (http, seen) = upstream(flaky);
            let (client, h) = full_client(
                http,
                Opts {
                    limit: 4,
                    ..Opts::default()
                },
            );
            let svc = Buffer::new(client, cap);
            let out = timeout(BOUND, drive(svc, tasks, 9))
                .await
                .unwrap_or_else(|_| panic!("Buffer({cap}) with {tasks} tasks deadlocked"));
            assert_eq!(out.len(), tasks * 9);
            for r in &out {
                assert_eq!(r, &Ok(200), "Buffer({cap}), {tasks} tasks: {out:?}");
            }
            assert_eq!(in_flight(&h.conc), 0);
            assert_eq!(seen.active(), 0);
            // Each POST ran twice (503, then the retry), both with one key.
            let keys = seen.keys.lock().unwrap().clone();
            let mut per_path: HashMap<String, Vec<String>> = HashMap::new();
            for (p, k) in keys {
                per_path.entry(p).or_default().push(k);
            }
            for (p, ks) in per_path {
                assert_eq!(ks.len(), 2, "{p}: {ks:?}");
                assert_eq!(ks[0], ks[1], "{p}: a retry carried another key");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn every_option_on_kept_over_concurrency_limit_1_and_under_tower_layers() {
    for tasks in [1usize, 64] {
        let (http, _seen) = upstream(flaky);
        // ConcurrencyLimit(1) under the client (around the HTTP service).
        let limited = ServiceBuilder::new()
            .layer(ConcurrencyLimitLayer::new(1))
            .service(http.clone());
        let limited = Buffer::new(limited, 1);
        let (client, h) = full_client(limited, Opts::default());
        let out = timeout(BOUND, drive(client.clone(), tasks, 6))
            .await
            .unwrap_or_else(|_| panic!("ConcurrencyLimit(1) below, {tasks} tasks: deadlock"));
        assert!(out.iter().all(|r| r == &Ok(200)), "{out:?}");
        assert_eq!(in_flight(&h.conc), 0);

        // Timeout, tower RateLimit, ConcurrencyLimit(1) and Buffer(1) above the client, boxed.
        let above = ServiceBuilder::new()
            .buffer(1)
            .concurrency_limit(1)
            .timeout(Duration::from_secs(60))
            .rate_limit(1000, Duration::from_secs(1))
            .service(client.clone());
        let above: BoxCloneSyncService<Req, Response<Body>, BoxError> =
            BoxCloneSyncService::new(Buffer::new(above, 1024));
        let out = timeout(BOUND, drive(above, tasks, 6))
            .await
            .unwrap_or_else(|_| panic!("tower layers above, {tasks} tasks: deadlock"));
        assert!(out.iter().all(|r| r == &Ok(200)), "{out:?}");

        // LoadShed over ConcurrencyLimit(1) over the client: what is not shed succeeds, and
        // nothing is left in flight.
        let shed = ServiceBuilder::new()
            .buffer(1024)
            .load_shed()
            .concurrency_limit(1)
            .service(client.clone());
        let out = timeout(BOUND, drive(shed, tasks, 6))
            .await
            .unwrap_or_else(|_| panic!("LoadShed, {tasks} tasks: deadlock"));
        let ok = out.iter().filter(|r| **r == Ok(200)).count();
        assert!(ok >= 1, "{out:?}");
        for r in &out {
            if let Err(e) = r {
                assert!(e.contains("overloaded"), "{e}");
            }
        }
        assert_eq!(in_flight(&h.conc), 0);
    }
}

// ------------------------------------------------------------------------------------------
// Errors through Buffer's wrapping.
// ------------------------------------------------------------------------------------------

/// docs/ARCHITECTURE.md: "through the composed client it is usually in the `source()` chain
/// under the retry layer's final error, so find it with `sturdy_core::find::<T>(&*err)`".
#[tokio::test(start_paused = true)]
async fn errors_through_buffer_timeout_and_box_are_found_by_type() {
    let (http, seen) = upstream(|_, _| ok());
    let (client, h) = full_client(
        http,
        Opts {
            quota: Some(Quota::per_minute(1).unwrap()),
            ..Opts::default()
        },
    );
    let wrapped: BoxCloneSyncService<Req, Response<Body>, BoxError> = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .buffer(1)
            .timeout(Duration::from_secs(600))
            .service(client),
    );
    // One slot a minute: the first call takes it; the second, with a 5 s deadline, is refused
    // at once (RELIABILITY.md: "a call whose turn would come after its deadline is refused at
    // once with `RateLimited` carrying the wait (not sent)").
    let mut svc = wrapped.clone();
    let res = timeout(BOUND, svc.ready().await.unwrap().call(get("/one")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut req = get("/two");
    req.extensions_mut().insert(
        CallOptions::new()
            .without_retries()
            .with_deadline(Duration::from_secs(5)),
    );
    let err = timeout(BOUND, svc.ready().await.unwrap().call(req))
        .await
        .unwrap()
        .expect_err("a call past its deadline's rate slot must be refused");
    let rl = sturdy::core::find::<RateLimited>(&*err)
        .unwrap_or_else(|| panic!("no RateLimited in the chain of: {err}"));
    assert!(rl.retry_after() > Duration::from_secs(5), "{rl:?}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent,
        "{err}"
    );
    assert_eq!(seen.calls("/two"), 0);

    // An open breaker, through the same wrapping.
    h.circuit.force_open(HOST);
    let err = timeout(BOUND, svc.ready().await.unwrap().call(get("/three")))
        .await
        .unwrap()
        .expect_err("a forced-open breaker must refuse");
    assert!(
        sturdy::core::find::<CircuitOpen>(&*err).is_some(),
        "no CircuitOpen in: {err}"
    );
    assert_eq!(seen.calls("/three"), 0);
    // A POST too: coalescing does not apply, the key layer does.
    let err = timeout(BOUND, svc.ready().await.unwrap().call(post("/orders/x")))
        .await
        .unwrap()
        .expect_err("a forced-open breaker must refuse");
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent,
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------
// Cancellation at every await, in the whole stack.
// ------------------------------------------------------------------------------------------

/// Polls `f` once in a task of its own and returns the task (abort it to drop the call).
fn start<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(f)
}

fn oneshot(
    client: &Client<Body>,
    req: Req,
) -> impl Future<Output = Result<Response<Body>, BoxError>> + Send + 'static {
    client.clone().oneshot(req)
}

/// A call dropped while it waits for a token gives back its adaptive-concurrency permit (the
/// permit is held for the attempt, and the token wait is part of it), does not cancel the token
/// request for the next caller, and the next call does not wait for anything the dropped one
/// held.
/// docs/ARCHITECTURE.md: "gives back what a dropped future holds: a probe slot, a rate slot, a
/// token wait"; sturdy-auth: "if the future is dropped first, the reservation is dropped with it".
#[tokio::test(start_paused = true)]
async fn a_call_dropped_during_its_token_fetch_gives_back_its_permit_and_the_fetch_goes_on() {
    let gate = Arc::new(Semaphore::new(0));
    let (tokens, fetched) = token_endpoint(gate.clone());
    let source =
        ClientCredentials::new(tokens, "http://auth.example.com/token", "id", "secret").unwrap();
    let (http, seen) = upstream(|_, _| ok());
    let (client, h) = full_client(
        http,
        Opts {
            limit: 1,
            auth: AuthLayer::oauth2(source),
            ..Opts::default()
        },
    );
    let a = start(oneshot(&client, get("/a")));
    settle().await;
    assert_eq!(
        fetched.load(Ordering::SeqCst),
        1,
        "the token request was not sent"
    );
    assert_eq!(
        in_flight(&h.conc),
        1,
        "a token wait holds the attempt's permit"
    );
    a.abort();
    let _ = a.await;
    settle().await;
    assert_eq!(in_flight(&h.conc), 0, "the dropped call kept its permit");
    assert_eq!(waiting(&h.conc), 0);
    assert_eq!(
        h.coalesce.in_flight(HOST),
        0,
        "the dropped call is still in the table"
    );

    // The next call (another path: not coalesced) takes the permit at once and shares the
    // token request still running.
    let b = start(oneshot(&client, get("/b")));
    settle().await;
    assert_eq!(
        in_flight(&h.conc),
        1,
        "the next call did not get the permit"
    );
    gate.add_permits(100);
    let res = timeout(BOUND, b).await.unwrap().unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        fetched.load(Ordering::SeqCst),
        1,
        "the token request was started again"
    );
    assert_eq!(seen.calls("/a"), 0);
    assert_eq!(seen.auth.lock().unwrap().as_slice(), ["Bearer tok-1"]);
}

/// A call dropped during a retry's backoff leaves nothing: no permit, no place in a line, no
/// half-open probe, no coalesced call the next identical request would join.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_in_its_retry_backoff_leaves_nothing_behind() {
    let (http, seen) = upstream(|_, n| {
        if n == 1 {
            Step::Answer(503, Duration::from_millis(1), vec![])
        } else {
            ok()
        }
    });
    let (client, h) = full_client(
        http,
        Opts {
            limit: 1,
            breaker: CircuitBreakerLayer::new().with_consecutive_failures(1),
            ..Opts::default()
        },
    );
    let a = start(oneshot(&client, get("/x")));
    // Let the first attempt answer 503; the retry now sleeps its backoff.
    for _ in 0..5 {
        settle().await;
        advance(Duration::from_millis(1)).await;
    }
    assert_eq!(seen.calls("/x"), 1);
    assert!(
        !a.is_finished(),
        "the call should be sleeping in its backoff"
    );
    assert_eq!(h.coalesce.in_flight(HOST), 1);
    a.abort();
    let _ = a.await;
    settle().await;
    assert_eq!(in_flight(&h.conc), 0);
    assert_eq!(
        h.coalesce.in_flight(HOST),
        0,
        "a call nobody waits for stays in the table"
    );
    assert_eq!(h.limits.waiting(HOST), 0);
    // The breaker opened on the 503 (a streak of 1): wait it out, then the next call is the
    // probe, and it is not refused as `Probing` by a probe the dropped call never sent.
    assert!(
        matches!(h.circuit.state(HOST), Some(CircuitState::Open { .. })),
        "{:?}",
        h.circuit.state(HOST)
    );
    advance(Duration::from_secs(31)).await;
    let res = timeout(BOUND, oneshot(&client, get("/x")))
        .await
        .unwrap()
        .expect("the next identical call failed");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(text(res).await, "/x#2");
    assert_eq!(h.circuit.state(HOST), Some(CircuitState::Closed));
}

/// docs/guides/ratelimit.md: a waiting call "reserves nothing of the limiter's ... If it is
/// dropped ... it leaves the line"; ARCHITECTURE: "a call waiting for a rate slot must not hold
/// a permit" (adaptive concurrency sits under the rate limiter).
#[tokio::test(start_paused = true)]
async fn a_call_waiting_for_a_rate_slot_holds_no_permit_and_leaves_the_line_when_dropped() {
    let (http, seen) = upstream(|_, _| ok());
    let (client, h) = full_client(
        http,
        Opts {
            limit: 1,
            quota: Some(Quota::per_second(1).unwrap()),
            ..Opts::default()
        },
    );
    let res = timeout(BOUND, oneshot(&client, get("/first")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let w = start(oneshot(&client, get("/waiter")));
    settle().await;
    assert_eq!(
        h.limits.waiting(HOST),
        1,
        "the second call should wait for its slot"
    );
    assert_eq!(
        in_flight(&h.conc),
        0,
        "a call waiting for a rate slot holds a permit"
    );
    w.abort();
    let _ = w.await;
    settle().await;
    assert_eq!(
        h.limits.waiting(HOST),
        0,
        "the dropped call is still in line"
    );
    assert_eq!(h.coalesce.in_flight(HOST), 0);
    // The next call goes at the next slot (within a second of the first), not after the
    // dropped one's turn.
    let t0 = tokio::time::Instant::now();
    let res = timeout(BOUND, oneshot(&client, get("/third")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        t0.elapsed() <= Duration::from_millis(1010),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(seen.calls("/waiter"), 0);
}

/// docs/guides/concurrency.md: "A dropped waiting call leaves the line"; the rate slot the
/// dropped call took above is not the next call's business.
#[tokio::test(start_paused = true)]
async fn a_call_waiting_for_a_permit_leaves_the_line_when_dropped_in_the_whole_stack() {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let (http, seen) = upstream(move |p, _| {
        if p == "/slow" {
            Step::Gate(g.clone())
        } else {
            ok()
        }
    });
    let (client, h) = full_client(
        http,
        Opts {
            limit: 1,
            ..Opts::default()
        },
    );
    let slow = start(oneshot(&client, get("/slow")));
    settle().await;
    assert_eq!(in_flight(&h.conc), 1);
    let w = start(oneshot(&client, post("/orders/w")));
    settle().await;
    assert_eq!(waiting(&h.conc), 1);
    w.abort();
    let _ = w.await;
    settle().await;
    assert_eq!(waiting(&h.conc), 0, "the dropped waiter is still in line");
    gate.add_permits(100);
    let res = timeout(BOUND, slow).await.unwrap().unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let t0 = tokio::time::Instant::now();
    let res = timeout(BOUND, oneshot(&client, post("/orders/next")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        t0.elapsed() < Duration::from_millis(50),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(seen.calls("/orders/w"), 0);
    assert_eq!(in_flight(&h.conc), 0);
}

/// A half-open breaker's probe that waits in the rate limiter's line (a pause the server asked
/// for) and is dropped there gives its probe slot back: the next call is the probe, not refused
/// with `Probing`. docs/guides/circuit.md: "A probe whose future is dropped gives its slot back."
#[tokio::test(start_paused = true)]
async fn a_probe_dropped_while_waiting_in_a_pause_gives_its_slot_back() {
    let (http, seen) = upstream(|p, _| {
        if p == "/boom" {
            Step::Answer(
                503,
                Duration::from_millis(1),
                vec![("retry-after", "20".into())],
            )
        } else {
            ok()
        }
    });
    let (client, h) = full_client(
        http,
        Opts {
            breaker: CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_secs(1), Duration::from_secs(1)),
            ..Opts::default()
        },
    );
    let mut req = get("/boom");
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    // docs/guides/retry.md: "a 429 or a 503 that carries a `Retry-After` ends the call as a
    // `RateLimited` error when that wait is not slept".
    let err = timeout(BOUND, oneshot(&client, req))
        .await
        .unwrap()
        .expect_err("a 503 with Retry-After, not slept, is a RateLimited error");
    assert!(sturdy::core::find::<RateLimited>(&*err).is_some(), "{err}");
    assert!(
        matches!(h.circuit.state(HOST), Some(CircuitState::Open { .. })),
        "{:?}",
        h.circuit.state(HOST)
    );
    assert!(
        h.limits.pause(HOST).is_some(),
        "a 503 with Retry-After pauses the host"
    );
    advance(Duration::from_millis(1_100)).await;

    // The probe: admitted by the breaker, then held by the pause below it.
    let mut probe_req = get("/p1");
    probe_req
        .extensions_mut()
        .insert(CallOptions::new().without_retries());
    let probe = start(oneshot(&client, probe_req));
    settle().await;
    assert_eq!(
        h.limits.waiting(HOST),
        1,
        "the probe should wait for the pause"
    );
    assert_eq!(h.circuit.state(HOST), Some(CircuitState::HalfOpen));
    probe.abort();
    let _ = probe.await;
    settle().await;
    assert_eq!(h.limits.waiting(HOST), 0);

    // The next call must be admitted as the probe (it then waits for the pause too).
    let mut next_req = get("/p2");
    next_req
        .extensions_mut()
        .insert(CallOptions::new().without_retries());
    let next = start(oneshot(&client, next_req));
    settle().await;
    if next.is_finished() {
        let r = next.await.unwrap();
        panic!(
            "the next call was refused: {:?}",
            r.map(|r| r.status()).map_err(|e| e.to_string())
        );
    }
    assert_eq!(h.limits.waiting(HOST), 1);
    h.limits.clear_pause(HOST);
    let res = timeout(BOUND, next).await.unwrap().unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(h.circuit.state(HOST), Some(CircuitState::Closed));
    assert_eq!(seen.calls("/p1"), 0);
}

/// docs/guides/hedge.md: "A dropped call drops both copies", and "the loser is dropped, which
/// gives its place under the concurrency limit back".
#[tokio::test(start_paused = true)]
async fn a_hedged_call_dropped_with_both_copies_in_flight_gives_both_permits_back() {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let (http, seen) = upstream(move |p, _| {
        if p == "/slow" {
            Step::Gate(g.clone())
        } else {
            Step::Answer(200, Duration::from_millis(2), vec![])
        }
    });
    let (client, h) = full_client(
        http,
        Opts {
            limit: 10,
            hedge_min_samples: 5,
            ..Opts::default()
        },
    );
    for i in 0..20 {
        let res = timeout(BOUND, oneshot(&client, get(&format!("/warm/{i}"))))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert!(
        h.hedge.stats(HOST).and_then(|s| s.delay()).is_some(),
        "no hedge delay after warming: {:?}",
        h.hedge.stats(HOST)
    );
    let call = start(oneshot(&client, get("/slow")));
    for _ in 0..40 {
        settle().await;
        advance(Duration::from_millis(1)).await;
    }
    assert_eq!(seen.calls("/slow"), 2, "the slow call was not hedged");
    assert_eq!(seen.active(), 2);
    assert_eq!(in_flight(&h.conc), 2);
    call.abort();
    let _ = call.await;
    settle().await;
    assert_eq!(seen.active(), 0, "a copy outlived its dropped call");
    assert_eq!(in_flight(&h.conc), 0, "a copy's permit was kept");
    assert_eq!(h.coalesce.in_flight(HOST), 0);
    gate.add_permits(100);
    let res = timeout(BOUND, oneshot(&client, get("/slow")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// docs/guides/coalesce.md: "a caller that goes away ... leaves the call to the others; it goes
/// on." Here the caller that started the shared call is dropped while that call waits for a
/// token; the joined caller gets the answer of the same upstream call, and nothing is sent twice.
#[tokio::test(start_paused = true)]
async fn a_joined_caller_gets_the_answer_when_the_leader_is_dropped_during_the_token_fetch() {
    let gate = Arc::new(Semaphore::new(0));
    let (tokens, fetched) = token_endpoint(gate.clone());
    let source =
        ClientCredentials::new(tokens, "http://auth.example.com/token", "id", "secret").unwrap();
    let (http, seen) = upstream(|_, _| ok());
    let (client, h) = full_client(
        http,
        Opts {
            auth: AuthLayer::oauth2(source),
            ..Opts::default()
        },
    );
    let leader = start(oneshot(&client, get("/doc")));
    settle().await;
    let follower = start(oneshot(&client, get("/doc")));
    settle().await;
    assert_eq!(h.coalesce.stats().joined(), 1, "{:?}", h.coalesce.stats());
    leader.abort();
    let _ = leader.await;
    settle().await;
    gate.add_permits(100);
    let res = timeout(BOUND, follower)
        .await
        .expect("the joined caller hung")
        .unwrap()
        .expect("the joined caller failed");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(text(res).await, "/doc#1");
    assert_eq!(seen.calls("/doc"), 1);
    assert_eq!(fetched.load(Ordering::SeqCst), 1);
}

/// The same, with the leader dropped while the shared call waits for a rate slot, and while it
/// sleeps a retry's backoff.
#[tokio::test(start_paused = true)]
async fn a_joined_caller_gets_the_answer_when_the_leader_is_dropped_in_a_rate_wait_or_a_backoff() {
    // Rate wait.
    let (http, seen) = upstream(|_, _| ok());
    let (client, h) = full_client(
        http,
        Opts {
            quota: Some(Quota::per_second(1).unwrap()),
            ..Opts::default()
        },
    );
    let _ = timeout(BOUND, oneshot(&client, get("/warm")))
        .await
        .unwrap()
        .unwrap();
    let leader = start(oneshot(&client, get("/doc")));
    settle().await;
    assert_eq!(h.limits.waiting(HOST), 1);
    let follower = start(oneshot(&client, get("/doc")));
    settle().await;
    leader.abort();
    let _ = leader.await;
    let res = timeout(BOUND, follower)
        .await
        .expect("the joined caller hung")
        .unwrap()
        .expect("the joined caller failed");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(seen.calls("/doc"), 1);
    assert_eq!(h.limits.waiting(HOST), 0);

    // Backoff.
    let (http, seen) = upstream(|_, n| {
        if n == 1 {
            Step::Answer(503, Duration::from_millis(1), vec![])
        } else {
            ok()
        }
    });
    let (client, h) = full_client(http, Opts::default());
    let leader = start(oneshot(&client, get("/doc")));
    let follower = start(oneshot(&client, get("/doc")));
    for _ in 0..5 {
        settle().await;
        advance(Duration::from_millis(1)).await;
    }
    assert_eq!(seen.calls("/doc"), 1);
    assert_eq!(h.coalesce.stats().joined(), 1);
    leader.abort();
    let _ = leader.await;
    let res = timeout(BOUND, follower)
        .await
        .expect("the joined caller hung")
        .unwrap()
        .expect("the joined caller failed");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(text(res).await, "/doc#2");
    assert_eq!(seen.calls("/doc"), 2);
}

/// tower's `Timeout` above the client cuts calls at every wait (token, rate slot, permit); a
/// kept service goes on serving afterwards, and nothing is left held.
#[tokio::test(start_paused = true)]
async fn tower_timeouts_above_the_client_cut_waits_and_leave_nothing_held() {
    let gate = Arc::new(Semaphore::new(0));
    let (tokens, fetched) = token_endpoint(gate.clone());
    let source =
        ClientCredentials::new(tokens, "http://auth.example.com/token", "id", "secret").unwrap();
    let (http, seen) = upstream(|_, _| ok());
    let (client, h) = full_client(
        http,
        Opts {
            limit: 1,
            quota: Some(Quota::per_second(2).unwrap()),
            auth: AuthLayer::oauth2(source),
            ..Opts::default()
        },
    );
    let mut svc = ServiceBuilder::new()
        .buffer(1)
        .timeout(Duration::from_millis(200))
        .service(client);
    // Token wait: cut by the timeout, eight times in a row on the kept service.
    for i in 0..8 {
        let r = timeout(
            BOUND,
            svc.ready().await.unwrap().call(get(&format!("/cut/{i}"))),
        )
        .await
        .unwrap();
        let e = r.expect_err("no token yet: the timeout must cut the call");
        assert!(
            e.is::<tower::timeout::error::Elapsed>(),
            "{e}: not tower's Elapsed"
        );
        assert_eq!(in_flight(&h.conc), 0, "after cut {i}");
        assert_eq!(waiting(&h.conc), 0, "after cut {i}");
    }
    assert_eq!(
        fetched.load(Ordering::SeqCst),
        1,
        "one token request for all the callers"
    );
    gate.add_permits(100);
    // At 2/s some calls wait longer than the 200 ms timeout and are cut: what is cut leaves
    // the line and its permit, every time.
    let mut ok = 0;
    let mut cut = 0;
    for i in 0..8 {
        let r = timeout(
            BOUND,
            svc.ready().await.unwrap().call(get(&format!("/go/{i}"))),
        )
        .await
        .unwrap();
        match r {
            Ok(res) => {
                assert_eq!(res.status(), StatusCode::OK);
                ok += 1;
            }
            Err(e) => {
                assert!(e.is::<tower::timeout::error::Elapsed>(), "{e}");
                cut += 1;
            }
        }
        assert_eq!(h.limits.waiting(HOST), 0);
        assert_eq!(in_flight(&h.conc), 0);
    }
    eprintln!("ok {ok}, cut {cut}, calls {:?}", seen.calls.lock().unwrap());
    assert!(ok >= 2, "ok {ok}, cut {cut}");
}

/// docs/guides/hedge.md: "A call whose first copy a layer below still holds back when the hedge
/// comes due (the rate limit's wait for a pause ..., the adaptive concurrency limit's line, the
/// auth layer's token fetch) is not hedged while it waits"; "from the moment the first copy is
/// let go, one more delay passes before the hedge is sent". In the whole `ClientBuilder` stack.
#[tokio::test(start_paused = true)]
async fn in_the_whole_stack_a_call_held_by_a_permit_or_a_token_wait_is_not_hedged_while_held() {
    let hold = Arc::new(Semaphore::new(0));
    let slow = Arc::new(Semaphore::new(0));
    let (h1, s1) = (hold.clone(), slow.clone());
    let (http, seen) = upstream(move |p, _| match p {
        "/hold" => Step::Gate(h1.clone()),
        "/slow" => Step::Gate(s1.clone()),
        _ => Step::Answer(200, Duration::from_millis(2), vec![]),
    });
    let (client, h) = full_client(
        http,
        Opts {
            limit: 1,
            hedge_min_samples: 5,
            ..Opts::default()
        },
    );
    for i in 0..20 {
        let _ = timeout(BOUND, oneshot(&client, get(&format!("/warm/{i}"))))
            .await
            .unwrap()
            .unwrap();
    }
    let delay = h
        .hedge
        .stats(HOST)
        .and_then(|s| s.delay())
        .expect("no delay");
    assert!(delay <= Duration::from_millis(20), "{delay:?}");
    // A POST holds the only permit; the GET waits in the concurrency line for a second.
    let holder = start(oneshot(&client, post("/hold")));
    settle().await;
    assert_eq!(in_flight(&h.conc), 1);
    let before = h.hedge.stats(HOST).map(|s| s.hedges()).unwrap_or(0);
    let call = start(oneshot(&client, get("/slow")));
    for _ in 0..100 {
        settle().await;
        advance(Duration::from_millis(10)).await;
    }
    let hedges = h.hedge.stats(HOST).map(|s| s.hedges()).unwrap_or(0) - before;
    assert_eq!(
        waiting(&h.conc),
        1,
        "one copy waits for the permit, not two"
    );
    assert_eq!(
        hedges, 0,
        "a hedge was sent while the first copy waited for a permit"
    );
    assert_eq!(seen.calls("/slow"), 0);
    // The holder answers: the first copy goes; the hedge only a delay later.
    hold.add_permits(1);
    let _ = timeout(BOUND, holder).await.unwrap().unwrap().unwrap();
    settle().await;
    assert_eq!(seen.calls("/slow"), 1);
    advance(delay / 2).await;
    settle().await;
    assert_eq!(
        seen.calls("/slow"),
        1,
        "hedged before a delay passed after the release"
    );
    for _ in 0..10 {
        advance(delay).await;
        settle().await;
    }
    // limit 1: the hedge waits for the permit held by the first copy; either way nothing is
    // lost when the call is dropped.
    call.abort();
    let _ = call.await;
    settle().await;
    assert_eq!(in_flight(&h.conc), 0);
    assert_eq!(waiting(&h.conc), 0);
    assert_eq!(seen.active(), 0);
    slow.add_permits(100);
}

/// 64 tasks drive one kept client (every option on) under `Buffer(1)`, each call cut by a
/// seeded timeout somewhere in its waits (token, backoff, rate slot, permit, hedge, coalesced
/// call, upstream); then everything shared is back to rest and the next calls go at once.
#[tokio::test(start_paused = true)]
async fn sixty_four_tasks_cancelling_at_random_leave_the_stack_at_rest() {
    let gate = Arc::new(Semaphore::new(0));
    let (tokens, fetched) = token_endpoint(gate.clone());
    let source =
        ClientCredentials::new(tokens, "http://auth.example.com/token", "id", "secret").unwrap();
    let (http, seen) = upstream(|p, n| {
        let h = p
            .bytes()
            .fold(n as u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
        match h % 7 {
            0 => Step::Answer(503, Duration::from_millis(h % 40), vec![]),
            1 => Step::Answer(200, Duration::from_millis(300 + h % 300), vec![]),
            _ => Step::Answer(200, Duration::from_millis(1 + h % 30), vec![]),
        }
    });
    let (client, h) = full_client(
        http,
        Opts {
            limit: 3,
            quota: Some(Quota::per_second(50).unwrap().with_burst(5).unwrap()),
            auth: AuthLayer::oauth2(source),
            hedge_min_samples: 10,
            ..Opts::default()
        },
    );
    let svc = Buffer::new(client.clone(), 1);
    let g2 = gate.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        g2.add_permits(1000);
    });
    let mut set = tokio::task::JoinSet::new();
    for t in 0..64u64 {
        let mut svc = svc.clone();
        set.spawn(async move {
            let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut done = 0;
            for i in 0..6u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let cut = Duration::from_millis(x % 900);
                let req = match (x >> 20) % 4 {
                    0 => get("/shared"),
                    1 => post(&format!("/orders/{t}/{i}")),
                    _ => get(&format!("/p/{}", x % 10)),
                };
                let call = async {
                    let ready = svc.ready().await?;
                    ready.call(req).await
                };
                if let Ok(Ok(_)) = tokio::time::timeout(cut, call).await {
                    done += 1;
                }
            }
            done
        });
    }
    let all = timeout(BOUND, async {
        let mut n = 0;
        while let Some(r) = set.join_next().await {
            n += r.unwrap();
        }
        n
    })
    .await
    .expect("the tasks deadlocked");
    eprintln!("{all} of 384 calls answered in time");
    // Let what was abandoned run down (coalesced calls nobody awaits, background refreshes).
    for _ in 0..20 {
        settle().await;
        advance(Duration::from_millis(100)).await;
    }
    assert_eq!(
        in_flight(&h.conc),
        0,
        "permits kept: {:?}",
        h.conc.state(HOST)
    );
    assert_eq!(waiting(&h.conc), 0);
    assert_eq!(h.limits.waiting(HOST), 0);
    assert_eq!(h.coalesce.in_flight(HOST), 0);
    assert_eq!(seen.active(), 0, "upstream calls outlived their callers");
    assert_eq!(
        fetched.load(Ordering::SeqCst),
        1,
        "the token request was started again"
    );
    assert!(
        !matches!(h.circuit.state(HOST), Some(CircuitState::HalfOpen)),
        "a probe was kept: {:?}",
        h.circuit.state(HOST)
    );
    h.circuit.force_close(HOST);
    // At rest: ten calls in a row, each answered (200 or a 503 of the script) within 2 s.
    let mut svc = svc;
    for i in 0..10 {
        let t0 = tokio::time::Instant::now();
        let r = timeout(
            Duration::from_secs(2),
            svc.ready()
                .await
                .unwrap()
                .call(post(&format!("/after/{i}"))),
        )
        .await
        .expect("a call after the storm hung");
        if let Err(e) = r {
            assert!(!e.to_string().contains("deadlock"), "{e}");
        }
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}

/// docs/guides/coalesce.md: a joined caller's error "carries a copy" of the `CallReport`, and
/// "`sturdy_core::find::<hyper::Error>(&*err)` and `classify_error` work as for the original".
/// Here the shared call's retry meets the breaker it opened (coalesce + retry + breaker), and a
/// server wait too long to sleep (coalesce + retry + rate limit): the joined caller finds the
/// same types, report and delivery as the caller that started the call.
#[tokio::test(start_paused = true)]
async fn a_joined_caller_finds_circuit_open_and_rate_limited_as_the_leader_does() {
    use sturdy::core::Error as SturdyError;
    for case in ["breaker", "wait"] {
        let (http, seen) = upstream(move |_, _| match case {
            "breaker" => Step::Answer(503, Duration::from_millis(50), vec![]),
            _ => Step::Answer(
                429,
                Duration::from_millis(50),
                vec![("retry-after", "600".into())],
            ),
        });
        let (client, _h) = full_client(
            http,
            Opts {
                breaker: CircuitBreakerLayer::new().with_consecutive_failures(1),
                ..Opts::default()
            },
        );
        let leader = start(oneshot(&client, get("/doc")));
        settle().await;
        let follower = start(oneshot(&client, get("/doc")));
        let l = timeout(BOUND, leader).await.unwrap().unwrap();
        let f = timeout(BOUND, follower).await.unwrap().unwrap();
        let (l, f) = match (l, f) {
            (Err(l), Err(f)) => (l, f),
            (l, f) => panic!(
                "{case}: expected two errors, got {:?} and {:?}",
                l.map(|r| r.status()),
                f.map(|r| r.status())
            ),
        };
        assert_eq!(seen.calls("/doc"), 1, "{case}: {l} / {f}");
        // docs/guides/coalesce.md: "with the message \"the call shared by identical requests in
        // flight failed: <the error>\"".
        // Every caller, the one that started the call too.
        assert!(
            f.to_string()
                .starts_with("the call shared by identical requests in flight failed: "),
            "{case}: {f}"
        );
        assert_eq!(f.to_string(), l.to_string(), "{case}");
        match case {
            "breaker" => {
                assert!(
                    sturdy::core::find::<CircuitOpen>(&*l).is_some(),
                    "leader: {l}"
                );
                assert!(
                    sturdy::core::find::<CircuitOpen>(&*f).is_some(),
                    "follower: {f}"
                );
            }
            _ => {
                let lr = sturdy::core::find::<RateLimited>(&*l).expect("leader");
                let fr = sturdy::core::find::<RateLimited>(&*f)
                    .unwrap_or_else(|| panic!("follower has no RateLimited: {f}"));
                assert_eq!(lr.retry_after(), fr.retry_after());
                // docs/RELIABILITY.md: "the call fails at once with `RateLimited`, whose wait
                // is the server's capped at 5 min".
                assert_eq!(lr.retry_after(), Duration::from_secs(300), "{l}");
            }
        }
        assert_eq!(
            sturdy::core::classify::delivery(&*l),
            sturdy::core::classify::delivery(&*f),
            "{case}: {l} / {f}"
        );
        let lrep = l
            .downcast_ref::<SturdyError>()
            .and_then(|e| e.report())
            .map(|r| (r.attempts(), r.delivery()));
        let frep = f
            .downcast_ref::<SturdyError>()
            .and_then(|e| e.report())
            .map(|r| (r.attempts(), r.delivery()));
        assert!(
            lrep.is_some(),
            "{case}: the leader's error has no report: {l}"
        );
        assert_eq!(lrep, frep, "{case}: {l} / {f}");
    }
}

/// An HTTP service whose `poll_ready` fails: docs/guides/retry.md says such an error "is
/// returned as it is"; under tower's `Buffer` it comes wrapped in Buffer's `ServiceError`, and
/// `sturdy::core::find` still finds the original type under it.
#[tokio::test(start_paused = true)]
async fn a_failing_poll_ready_is_found_through_buffers_service_error() {
    #[derive(Clone)]
    struct Broken;
    impl Service<Req> for Broken {
        type Response = Res;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Res, BoxError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            std::task::Poll::Ready(Err(Box::new(sturdy::core::Error::new(
                sturdy::core::ErrorKind::Connect,
                "pool closed",
            ))))
        }
        fn call(&mut self, _: Req) -> Self::Future {
            std::future::ready(Ok(Response::new(Full::default())))
        }
    }
    let (client, _h) = full_client(Broken, Opts::default());
    let mut svc = Buffer::new(client, 1);
    let err = timeout(BOUND, async {
        match svc.ready().await {
            Ok(s) => s.call(get("/x")).await.expect_err("no error"),
            Err(e) => e,
        }
    })
    .await
    .expect("hung");
    let found = sturdy::core::find::<sturdy::core::Error>(&*err)
        .unwrap_or_else(|| panic!("no sturdy error under: {err} ({err:?})"));
    assert!(found.to_string().contains("pool closed"), "{found}");
}

/// A kept client with OAuth2 over a `ConcurrencyLimit(1)` around the HTTP service: every call
/// meets a 401 on its first token and is replayed with the next, from 8 tasks; the replay
/// waits for the permit the first response gave back, and nothing deadlocks.
/// sturdy-auth: "The replay after a 401 drives the same service to readiness again, after the
/// first response released what it held."
#[tokio::test(start_paused = true)]
async fn replays_after_401_over_a_limit_of_one_under_the_whole_stack_from_eight_tasks() {
    let gate = Arc::new(Semaphore::new(1000));
    let (tokens, fetched) = token_endpoint(gate);
    let source =
        ClientCredentials::new(tokens, "http://auth.example.com/token", "id", "secret").unwrap();
    let seen401 = Arc::new(AtomicUsize::new(0));
    let s2 = seen401.clone();
    // An API that refuses the first token (tok-1) and accepts the next.
    let api = tower::service_fn(move |req: Req| {
        let s2 = s2.clone();
        async move {
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            tokio::time::sleep(Duration::from_millis(3)).await;
            let status = if auth == "Bearer tok-1" {
                s2.fetch_add(1, Ordering::SeqCst);
                401
            } else {
                200
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::from("x"))
                    .unwrap(),
            )
        }
    });
    let limited = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api);
    let limited = Buffer::new(limited, 1);
    let (client, h) = full_client(
        limited,
        Opts {
            auth: AuthLayer::oauth2(source),
            ..Opts::default()
        },
    );
    let mut set = tokio::task::JoinSet::new();
    for t in 0..8 {
        let mut c = client.clone();
        set.spawn(async move {
            let mut out = vec![];
            for i in 0..4 {
                let req = if i % 2 == 0 {
                    get(&format!("/r/{t}/{i}"))
                } else {
                    post(&format!("/o/{t}/{i}"))
                };
                let r = c.ready().await.unwrap().call(req).await;
                out.push(r.map(|r| r.status().as_u16()).map_err(|e| e.to_string()));
            }
            out
        });
    }
    let all = timeout(BOUND, async {
        let mut v = vec![];
        while let Some(r) = set.join_next().await {
            v.extend(r.unwrap());
        }
        v
    })
    .await
    .expect("replays over a limit of one deadlocked");
    assert!(all.iter().all(|r| r == &Ok(200)), "{all:?}");
    assert!(seen401.load(Ordering::SeqCst) >= 1);
    assert!(
        fetched.load(Ordering::SeqCst) <= 3,
        "{}",
        fetched.load(Ordering::SeqCst)
    );
    assert_eq!(in_flight(&h.conc), 0);
}

/// A call released by slow start at the end of a pause, then held in the adaptive concurrency
/// line below the limiter and dropped there, gives its release place back, so the next caller
/// in the pause's line is let out (rate limit + adaptive concurrency + cancellation).
/// docs/guides/ratelimit.md: "a released call gives its place back when it finishes, fails, is
/// dropped or panics."
#[tokio::test(start_paused = true)]
async fn a_released_call_dropped_while_waiting_for_a_permit_gives_its_place_back() {
    let hold = Arc::new(Semaphore::new(0));
    let h1 = hold.clone();
    let (http, seen) = upstream(move |p, _| match p {
        "/hold" => Step::Gate(h1.clone()),
        "/p" => Step::Answer(
            429,
            Duration::from_millis(1),
            vec![("retry-after", "1".into())],
        ),
        _ => Step::Answer(200, Duration::from_millis(1), vec![]),
    });
    let (client, h) = full_client(
        http,
        Opts {
            limit: 2,
            bounds: Some((1, 10)),
            ..Opts::default()
        },
    );
    let holder = start(oneshot(&client, get("/hold")));
    settle().await;
    assert_eq!(in_flight(&h.conc), 1);
    let mut p = get("/p");
    p.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let _ = timeout(BOUND, oneshot(&client, p)).await.unwrap();
    assert!(h.limits.pause(HOST).is_some());
    h.conc.set_limit(HOST, 1);
    let mut r1 = get("/r1");
    r1.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let r1 = start(oneshot(&client, r1));
    settle().await;
    let mut r2 = get("/r2");
    r2.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let r2 = start(oneshot(&client, r2));
    settle().await;
    assert_eq!(h.limits.waiting(HOST), 2);
    // The pause ends: slow start lets r1 out; it waits for the permit the holder has.
    advance(Duration::from_millis(1_100)).await;
    settle().await;
    assert_eq!(h.limits.waiting(HOST), 1, "r1 should have been released");
    assert_eq!(waiting(&h.conc), 1, "r1 should wait for the permit");
    r1.abort();
    let _ = r1.await;
    settle().await;
    assert!(waiting(&h.conc) <= 1, "r1 stayed in the permit line");
    // r2 is let out in r1's place: it now waits for the permit, not in the limiter's line.
    advance(Duration::from_millis(10)).await;
    settle().await;
    assert_eq!(
        h.limits.waiting(HOST),
        0,
        "r2 still waits in the pause's line after r1 was dropped"
    );
    hold.add_permits(1);
    let _ = timeout(BOUND, holder).await.unwrap().unwrap().unwrap();
    let t0 = tokio::time::Instant::now();
    let r = timeout(BOUND, r2).await.unwrap().unwrap();
    let waited = t0.elapsed();
    let r = r.unwrap_or_else(|e| panic!("r2 failed after {waited:?}: {e}"));
    assert_eq!(r.status(), StatusCode::OK);
    assert!(waited < Duration::from_millis(100), "r2 waited {waited:?}");
    assert_eq!(seen.calls("/r1"), 0);
}

/// Opens the breaker with one 500 (a streak of 1, open 1 s) and waits into half-open.
async fn open_then_half_open(client: &Client<Body>, h: &Handles) {
    let mut req = get("/fail");
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let _ = timeout(BOUND, oneshot(client, req)).await.unwrap();
    assert!(
        matches!(h.circuit.state(HOST), Some(CircuitState::Open { .. })),
        "{:?}",
        h.circuit.state(HOST)
    );
    advance(Duration::from_millis(1_100)).await;
}

/// A half-open probe that is hedged: the second copy is refused (`Probing`) while the probe
/// runs; the call waits for the probe; dropped, it gives the probe slot back (hedge + breaker +
/// cancellation).
#[tokio::test(start_paused = true)]
async fn a_hedged_probe_dropped_gives_its_slot_back() {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let (http, seen) = upstream(move |p, _| match p {
        "/fail" => Step::Answer(500, Duration::from_millis(1), vec![]),
        "/slow" => Step::Gate(g.clone()),
        _ => Step::Answer(200, Duration::from_millis(2), vec![]),
    });
    let (client, h) = full_client(
        http,
        Opts {
            hedge_min_samples: 5,
            breaker: CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_secs(1), Duration::from_secs(1)),
            ..Opts::default()
        },
    );
    for i in 0..20 {
        let _ = timeout(BOUND, oneshot(&client, get(&format!("/warm/{i}"))))
            .await
            .unwrap()
            .unwrap();
    }
    assert!(h.hedge.stats(HOST).and_then(|s| s.delay()).is_some());
    open_then_half_open(&client, &h).await;
    let probe = start(oneshot(&client, get("/slow")));
    for _ in 0..10 {
        settle().await;
        advance(Duration::from_millis(10)).await;
    }
    assert_eq!(
        seen.calls("/slow"),
        1,
        "the probe went once; the hedge was refused"
    );
    assert!(
        !probe.is_finished(),
        "the call must wait for its probe copy"
    );
    assert_eq!(h.circuit.state(HOST), Some(CircuitState::HalfOpen));
    probe.abort();
    let _ = probe.await;
    settle().await;
    assert_eq!(seen.active(), 0);
    // The next call is the probe.
    let r = timeout(BOUND, oneshot(&client, get("/next")))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the next call was refused: {e}"));
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(h.circuit.state(HOST), Some(CircuitState::Closed));
    gate.add_permits(100);
}

/// docs/guides/circuit.md: a `Probing` refusal "is looked at again after the backoff base ...
/// for as long as the deadline allows; such a refusal sent nothing, so it uses up neither an
/// attempt nor the retry budget". With two attempts, a call that waits out a slow probe still
/// has both: a 429 (with `Retry-After: 1`), then a 200.
#[tokio::test(start_paused = true)]
async fn probing_refusals_while_waiting_for_a_probe_use_up_no_attempt() {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let (http, seen) = upstream(move |p, n| match p {
        "/fail" => Step::Answer(500, Duration::from_millis(1), vec![]),
        "/probe" => Step::Gate(g.clone()),
        // A 429 is no breaker failure (a 503 would reopen a breaker with a streak of 1).
        "/w" if n == 1 => Step::Answer(
            429,
            Duration::from_millis(1),
            vec![("retry-after", "1".into())],
        ),
        _ => Step::Answer(200, Duration::from_millis(1), vec![]),
    });
    let (client, h) = full_client(
        http,
        Opts {
            breaker: CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_secs(1), Duration::from_secs(1)),
            ..Opts::default()
        },
    );
    open_then_half_open(&client, &h).await;
    let probe = start(oneshot(&client, get("/probe")));
    settle().await;
    assert_eq!(seen.calls("/probe"), 1);
    let mut w = post("/w");
    w.extensions_mut().insert(
        CallOptions::new()
            .with_max_attempts(2)
            .with_deadline(Duration::from_secs(20))
            .with_idempotency_key("s113-w"),
    );
    let waiter = start(oneshot(&client, w));
    // Ten looks or so at the half-open breaker, then the probe answers 200 and closes it.
    for _ in 0..30 {
        settle().await;
        advance(Duration::from_millis(100)).await;
    }
    assert_eq!(seen.calls("/w"), 0, "sent while the probe was out");
    gate.add_permits(100);
    let _ = timeout(BOUND, probe).await.unwrap().unwrap().unwrap();
    assert_eq!(h.circuit.state(HOST), Some(CircuitState::Closed));
    let r = timeout(BOUND, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_else(|e| panic!("the waiting call failed: {e}"));
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "the refusals used up its attempts"
    );
    assert_eq!(seen.calls("/w"), 2);
}

/// docs/guides/hedge.md: the loser "is dropped, which gives ... a slow-start release place or a
/// remote slot it was still waiting for" back, and "A dropped call drops both copies". Here the
/// hedge copy waits in the quota's line when the call is dropped: it leaves the line, and the
/// next call takes the next slot.
#[tokio::test(start_paused = true)]
async fn a_hedge_copy_waiting_for_a_rate_slot_leaves_the_line_when_the_call_is_dropped() {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let (http, seen) = upstream(move |p, _| match p {
        "/slow" => Step::Gate(g.clone()),
        _ => Step::Answer(200, Duration::from_millis(2), vec![]),
    });
    let (client, h) = full_client(
        http,
        Opts {
            quota: Some(Quota::per_second(5).unwrap()),
            hedge_min_samples: 5,
            ..Opts::default()
        },
    );
    for i in 0..20 {
        let _ = timeout(BOUND, oneshot(&client, get(&format!("/warm/{i}"))))
            .await
            .unwrap()
            .unwrap();
    }
    assert!(h.hedge.stats(HOST).and_then(|s| s.delay()).is_some());
    // Let the quota fill up again, then use its one slot with the slow call.
    advance(Duration::from_secs(2)).await;
    let call = start(oneshot(&client, get("/slow")));
    for _ in 0..6 {
        settle().await;
        advance(Duration::from_millis(10)).await;
    }
    assert_eq!(seen.calls("/slow"), 1);
    let hedged = h.hedge.stats(HOST).map(|s| s.hedges()).unwrap_or(0);
    eprintln!("hedges so far {hedged}, waiting {}", h.limits.waiting(HOST));
    assert_eq!(
        h.limits.waiting(HOST),
        1,
        "the hedge copy should wait for the next slot"
    );
    call.abort();
    let _ = call.await;
    settle().await;
    assert_eq!(
        h.limits.waiting(HOST),
        0,
        "the dropped hedge copy is still in line"
    );
    assert_eq!(seen.active(), 0);
    let t0 = tokio::time::Instant::now();
    let r = timeout(BOUND, oneshot(&client, get("/next")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        t0.elapsed() <= Duration::from_millis(200),
        "{:?}",
        t0.elapsed()
    );
    gate.add_permits(10);
}

/// Drives `svc` under `Buffer(1)` from 64 tasks, each call cut by a seeded timeout; then
/// five calls in a row must each be answered within two (paused) seconds.
async fn storm_alone<S>(name: &str, svc: S)
where
    S: Service<Req> + Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    S::Future: Send,
    S::Response: Send + 'static,
{
    let svc = Buffer::new(svc, 1);
    let mut set = tokio::task::JoinSet::new();
    for t in 0..64u64 {
        let mut svc = svc.clone();
        set.spawn(async move {
            let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for i in 0..6u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let req = match x % 3 {
                    0 => get("/shared"),
                    1 => get(&format!("/g/{t}/{i}")),
                    _ => post(&format!("/o/{t}/{i}")),
                };
                let cut = Duration::from_millis((x >> 8) % 700);
                let _ = tokio::time::timeout(cut, async {
                    let ready = svc.ready().await?;
                    ready.call(req).await
                })
                .await;
            }
        });
    }
    timeout(BOUND, async {
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name}: the tasks deadlocked"));
    advance(Duration::from_secs(2)).await;
    let mut svc = svc;
    for i in 0..5 {
        let r = timeout(Duration::from_secs(2), async {
            let ready = svc.ready().await?;
            ready.call(get(&format!("/after/{i}"))).await.map(|_| ())
        })
        .await
        .unwrap_or_else(|_| panic!("{name}: call {i} after the storm hung"));
        if let Err(e) = r {
            panic!("{name}: call {i} after the storm failed: {e}");
        }
    }
}

fn stormy(path: &str, n: usize) -> Step {
    if path.starts_with("/after") {
        return Step::Answer(200, Duration::from_millis(1), vec![]);
    }
    let h = path.bytes().fold(n as u64, |a, b| {
        a.wrapping_mul(31).wrapping_add(u64::from(b))
    });
    match h % 9 {
        0 => Step::Answer(503, Duration::from_millis(h % 50), vec![]),
        1 => Step::Answer(
            429,
            Duration::from_millis(2),
            vec![("retry-after", "1".into())],
        ),
        2 => Step::Answer(401, Duration::from_millis(2), vec![]),
        3 | 4 => Step::Answer(200, Duration::from_millis(200 + h % 400), vec![]),
        _ => Step::Answer(200, Duration::from_millis(1 + h % 40), vec![]),
    }
}

/// Each layer alone, over `ConcurrencyLimit(1)` and under `Buffer(1)`, driven as kept services
/// by 64 tasks whose calls are cut at every await; nothing is stranded (README: "Every layer
/// keeps tower's readiness contract").
#[tokio::test(start_paused = true)]
async fn each_layer_alone_over_a_limit_of_one_survives_cancellation_from_64_tasks() {
    use tower::Layer;
    macro_rules! alone {
        ($name:expr, $layer:expr) => {{
            let (http, seen) = upstream(stormy);
            let limited = ServiceBuilder::new()
                .layer(ConcurrencyLimitLayer::new(1))
                .service(http);
            storm_alone($name, $layer.layer(limited)).await;
            assert_eq!(
                seen.active(),
                0,
                "{}: upstream calls outlived their callers",
                $name
            );
        }};
    }
    alone!("retry", RetryLayer::new().with_seed(3));
    alone!(
        "attempt timeout",
        sturdy::retry::AttemptTimeoutLayer::new(Some(Duration::from_millis(300)))
    );
    alone!(
        "rate limit quota",
        RateLimitLayer::new(Quota::per_second(20).unwrap())
    );
    alone!("rate limit adaptive", RateLimitLayer::adaptive_only());
    alone!(
        "breaker",
        CircuitBreakerLayer::new()
            .with_consecutive_failures(2)
            .with_open_duration(Duration::from_millis(500), Duration::from_millis(500))
    );
    alone!(
        "adaptive concurrency",
        AdaptiveConcurrencyLayer::new().with_limits(1, 2)
    );
    alone!(
        "hedge",
        HedgeLayer::new()
            .with_min_samples(5)
            .with_delay_bounds(Duration::from_millis(10), Duration::from_millis(50))
    );
    alone!("coalesce", CoalesceLayer::new());
    alone!(
        "version",
        VersionLayer::header("api-version", "2024-06-01").unwrap()
    );
    alone!("idempotency keys", IdempotencyKeyLayer::new());
    alone!("auth static", AuthLayer::bearer("b").unwrap());
    {
        let gate = Arc::new(Semaphore::new(0));
        let (tokens, _fetched) = token_endpoint(gate.clone());
        let source =
            ClientCredentials::new(tokens, "http://auth.example.com/token", "id", "secret")
                .unwrap();
        let g = gate.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(900)).await;
            g.add_permits(1000);
        });
        alone!("auth oauth2", AuthLayer::oauth2(source));
    }
}

/// A user's own `ServiceBuilder` stack with sturdy's layers (`ServiceBuilderExt`) and tower's
/// interleaved: retry and a streak-of-one breaker above tower's `LoadShed` over
/// `ConcurrencyLimit(1)`. Shed tries were never sent: the breaker does not count them, and a
/// call that ends shed says `NotSent`. docs/guides/circuit.md: "an error for a call that never
/// reached the dependency is not counted at all ... tower's `LoadShed` over a service that is
/// not ready".
#[tokio::test(start_paused = true)]
async fn service_builder_ext_over_load_shed_and_a_limit_of_one() {
    use sturdy::ServiceBuilderExt;
    let (http, seen) = upstream(|_, _| Step::Answer(200, Duration::from_millis(50), vec![]));
    let (cb, circuit) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = ServiceBuilder::new()
        .buffer(64)
        .sturdy_idempotency(IdempotencyKeyLayer::new())
        .sturdy_retry(RetryLayer::new().with_seed(5))
        .sturdy_circuit_breaker(cb)
        .sturdy_rate_limit(RateLimitLayer::adaptive_only())
        .load_shed()
        .concurrency_limit(1)
        .sturdy_auth(AuthLayer::bearer("x").unwrap())
        .sturdy_version(VersionLayer::header("api-version", "1").unwrap())
        .sturdy_attempt_timeout(sturdy::retry::AttemptTimeoutLayer::new(Some(
            Duration::from_secs(5),
        )))
        .service(http);
    let mut set = tokio::task::JoinSet::new();
    for t in 0..16 {
        let mut svc = svc.clone();
        set.spawn(async move {
            let mut out = vec![];
            for i in 0..3 {
                let req = if i == 1 {
                    post(&format!("/o/{t}/{i}"))
                } else {
                    get(&format!("/g/{t}/{i}"))
                };
                let r = svc.ready().await.unwrap().call(req).await;
                out.push(r.map(|r| r.status().as_u16()));
            }
            out
        });
    }
    let all = timeout(BOUND, async {
        let mut v = vec![];
        while let Some(r) = set.join_next().await {
            v.extend(r.unwrap());
        }
        v
    })
    .await
    .expect("deadlock");
    let ok = all.iter().filter(|r| matches!(r, Ok(200))).count();
    let sent: usize = seen.calls.lock().unwrap().values().sum();
    assert!(ok >= 1);
    assert_eq!(
        sent, ok,
        "a call that was sent and answered 200 came back as an error"
    );
    for r in &all {
        if let Err(e) = r {
            assert_eq!(
                sturdy::core::classify::delivery(&**e),
                sturdy::core::Delivery::NotSent,
                "{e}"
            );
        }
    }
    assert_eq!(circuit.state(HOST), Some(CircuitState::Closed));
}

/// A call whose deadline ends while its first attempt is held below the retry layer (a token
/// wait, the adaptive concurrency line) was never sent, with every option on (hedging between
/// the retry layer and the layers that hold). docs/guides/auth.md: "So does a call whose overall
/// deadline ... ends while it waits for its first token, in a `ClientBuilder` stack: \"the
/// overall deadline of 200ms passed while attempt 1 waited for an access token, before it was
/// sent\"".
#[tokio::test(start_paused = true)]
async fn a_deadline_ending_while_the_first_attempt_is_held_says_not_sent() {
    use sturdy::core::Delivery;
    // Token wait.
    let gate = Arc::new(Semaphore::new(0));
    let (tokens, _fetched) = token_endpoint(gate.clone());
    let source =
        ClientCredentials::new(tokens, "http://auth.example.com/token", "id", "secret").unwrap();
    let (http, seen) = upstream(|_, _| ok());
    let (client, _h) = full_client(
        http,
        Opts {
            auth: AuthLayer::oauth2(source),
            hedge_min_samples: 1,
            ..Opts::default()
        },
    );
    let mut req = post("/orders/d");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(200)));
    let err = timeout(BOUND, oneshot(&client, req))
        .await
        .unwrap()
        .expect_err("no token: the deadline must end the call");
    assert!(
        err.to_string().contains(
            "the overall deadline of 200ms passed while attempt 1 waited for an access token, before it was sent"
        ),
        "{err}"
    );
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::NotSent,
        "{err}"
    );
    assert_eq!(seen.calls("/orders/d"), 0);
    gate.add_permits(100);

    // The adaptive concurrency line.
    let hold = Arc::new(Semaphore::new(0));
    let h1 = hold.clone();
    let (http, seen) = upstream(move |p, _| {
        if p == "/hold" {
            Step::Gate(h1.clone())
        } else {
            ok()
        }
    });
    let (client, h) = full_client(
        http,
        Opts {
            limit: 1,
            ..Opts::default()
        },
    );
    let holder = start(oneshot(&client, get("/hold")));
    settle().await;
    let mut req = post("/orders/e");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(200)));
    let err = timeout(BOUND, oneshot(&client, req))
        .await
        .unwrap()
        .expect_err("the permit is held: the deadline must end the call");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::NotSent,
        "{err}"
    );
    assert!(
        !err.to_string().contains("may have been processed"),
        "{err}"
    );
    assert_eq!(seen.calls("/orders/e"), 0);
    assert_eq!(waiting(&h.conc), 0);
    hold.add_permits(1);
    let _ = timeout(BOUND, holder).await.unwrap();
}

/// The same sentence, with sturdy's own hedge layer made optional the way tower offers:
/// `with_hedge(tower::util::option_layer(Some(HedgeLayer::new())))`. auth.md promises the
/// words and `NotSent` "in a `ClientBuilder` stack"; `RetryLayer::with_hold_marks`'s rustdoc
/// says the builder turns the marks on when "every layer in its stack is its default or one of
/// sturdy's", and here every layer is sturdy's, only wrapped in tower's `Either`. Nothing was
/// sent, yet the call says it may have been processed.
#[tokio::test(start_paused = true)]
async fn a_deadline_ending_in_the_token_wait_says_not_sent_with_an_option_layer_hedge() {
    use sturdy::core::Delivery;
    let gate = Arc::new(Semaphore::new(0));
    let (tokens, _fetched) = token_endpoint(gate.clone());
    let source =
        ClientCredentials::new(tokens, "http://auth.example.com/token", "id", "secret").unwrap();
    let (http, seen) = upstream(|_, _| ok());
    let client: Client<Full<Bytes>> = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(source))
        .with_hedge(tower::util::option_layer(Some(HedgeLayer::new())))
        .build(http);
    let mut req = post("/orders/d");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(200)));
    let err = timeout(BOUND, client.oneshot(req))
        .await
        .unwrap()
        .expect_err("no token: the deadline must end the call");
    assert_eq!(seen.calls("/orders/d"), 0);
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::NotSent,
        "{err}"
    );
    assert!(
        err.to_string().contains(
            "the overall deadline of 200ms passed while attempt 1 waited for an access token, before it was sent"
        ),
        "{err}"
    );
    gate.add_permits(100);
}

/// The other side of the same marks: a deadline that ends while a *later* wait holds the call,
/// after a request already reached the server, must not say `NotSent`. (a) The replay after a
/// 401 waits for a new token; (b) a hedge copy waits for a concurrency place while the first
/// copy is out. docs/guides/auth.md: "After a 401, a failed token wait for the replay is
/// different: the API saw the first attempt and answered it, so the error says
/// `Delivery::MaybeProcessed`"; docs/guides/hedge.md: "a call one of whose copies may have
/// reached the server is never reported as not sent".
#[tokio::test(start_paused = true)]
async fn a_deadline_ending_in_a_later_wait_after_a_send_says_maybe_processed() {
    use sturdy::core::Delivery;
    // (a) The replay's token wait.
    let gate = Arc::new(Semaphore::new(1));
    let (tokens, fetched) = token_endpoint(gate.clone());
    let source =
        ClientCredentials::new(tokens, "http://auth.example.com/token", "id", "secret").unwrap();
    let api = tower::service_fn(|req: Req| async move {
        let refused = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v == "Bearer tok-1");
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok::<_, Infallible>(
            Response::builder()
                .status(if refused { 401 } else { 200 })
                .body(Full::from("x"))
                .unwrap(),
        )
    });
    let (client, _h) = full_client(
        api,
        Opts {
            auth: AuthLayer::oauth2(source),
            hedge_min_samples: 1,
            ..Opts::default()
        },
    );
    let mut req = post("/orders/r");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(200)));
    let err = timeout(BOUND, oneshot(&client, req))
        .await
        .unwrap()
        .expect_err("the replay's token never comes: the deadline must end the call");
    assert_eq!(fetched.load(Ordering::SeqCst), 2, "{err}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::MaybeProcessed,
        "(a) {err}"
    );
    gate.add_permits(100);

    // (b) A hedge copy waiting for a concurrency place while the first copy is out.
    let slow = Arc::new(Semaphore::new(0));
    let s1 = slow.clone();
    let (http, seen) = upstream(move |p, _| {
        if p == "/slow" {
            Step::Gate(s1.clone())
        } else {
            Step::Answer(200, Duration::from_millis(2), vec![])
        }
    });
    let (client, h) = full_client(
        http,
        Opts {
            limit: 1,
            hedge_min_samples: 5,
            ..Opts::default()
        },
    );
    for i in 0..20 {
        let _ = timeout(BOUND, oneshot(&client, get(&format!("/warm/{i}"))))
            .await
            .unwrap()
            .unwrap();
    }
    assert!(h.hedge.stats(HOST).and_then(|s| s.delay()).is_some());
    let mut req = get("/slow");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(300)));
    let err = timeout(BOUND, oneshot(&client, req))
        .await
        .unwrap()
        .expect_err("the first copy never answers: the deadline must end the call");
    assert_eq!(seen.calls("/slow"), 1, "{err}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::MaybeProcessed,
        "(b) {err}"
    );
    slow.add_permits(100);
}

/// A retry's second attempt held below (a rate slot past the deadline, a concurrency place)
/// when the deadline ends: the first attempt reached the server, so the call may have been
/// processed, whatever held the second. docs/guides/retry.md: "When the last try was refused
/// after an attempt that ..." and README: "whether any attempt may have been processed".
#[tokio::test(start_paused = true)]
async fn a_deadline_ending_while_a_retry_is_held_after_a_sent_attempt_says_maybe_processed() {
    use sturdy::core::Delivery;
    for case in ["rate slot", "permit"] {
        let hold = Arc::new(Semaphore::new(0));
        let h1 = hold.clone();
        let (http, seen) = upstream(move |p, n| match p {
            "/hold" => Step::Gate(h1.clone()),
            "/orders/x" if n == 1 => Step::Answer(503, Duration::from_millis(5), vec![]),
            _ => ok(),
        });
        let (client, _h) = full_client(
            http,
            Opts {
                limit: if case == "permit" { 1 } else { 10 },
                quota: (case == "rate slot").then(|| Quota::per_minute(1).unwrap()),
                ..Opts::default()
            },
        );
        let mut req = post("/orders/x");
        req.extensions_mut()
            .insert(CallOptions::new().with_deadline(Duration::from_secs(2)));
        let call = start(oneshot(&client, req));
        settle().await;
        advance(Duration::from_millis(6)).await;
        settle().await;
        assert_eq!(seen.calls("/orders/x"), 1, "{case}");
        // The permit case: another call takes the only place while the retry sleeps.
        let holder = if case == "permit" {
            Some(start(oneshot(&client, post("/hold"))))
        } else {
            None
        };
        let err = timeout(BOUND, call)
            .await
            .unwrap()
            .unwrap()
            .expect_err("the retry is held past the deadline");
        assert_eq!(seen.calls("/orders/x"), 1, "{case}: {err}");
        assert_eq!(
            sturdy::core::classify::delivery(&*err),
            Delivery::MaybeProcessed,
            "{case}: {err}"
        );
        assert!(
            err.to_string().contains("may have been processed"),
            "{case}: {err}"
        );
        hold.add_permits(10);
        if let Some(h) = holder {
            let _ = timeout(BOUND, h).await;
        }
    }
}

type Chunks = http_body_util::StreamBody<
    futures_util::stream::BoxStream<'static, Result<http_body::Frame<Bytes>, Infallible>>,
>;

/// Counts upstream bodies alive.
struct BodyAlive(Arc<AtomicUsize>);
impl Drop for BodyAlive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An upstream whose body sends `part1`, waits for the gate, then sends `part2`.
fn gated_body_upstream(
    gate: Arc<Semaphore>,
) -> (
    impl Service<
            Req,
            Response = Response<Chunks>,
            Error = Infallible,
            Future = impl Future<Output = Result<Response<Chunks>, Infallible>> + Send,
        > + Clone
        + Send
        + Sync,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let alive = Arc::new(AtomicUsize::new(0));
    let (c, a) = (calls.clone(), alive.clone());
    let svc = tower::service_fn(move |_req: Req| {
        let (gate, c, a) = (gate.clone(), c.clone(), a.clone());
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            a.fetch_add(1, Ordering::SeqCst);
            let guard = BodyAlive(a);
            let stream =
                futures_util::stream::unfold((0u8, gate, guard), |(i, gate, guard)| async move {
                    match i {
                        0 => Some((
                            Ok(http_body::Frame::data(Bytes::from("part1"))),
                            (1, gate, guard),
                        )),
                        1 => {
                            gate.acquire().await.unwrap().forget();
                            Some((
                                Ok(http_body::Frame::data(Bytes::from("part2"))),
                                (2, gate, guard),
                            ))
                        }
                        _ => None,
                    }
                });
            let body: Chunks = http_body_util::StreamBody::new(Box::pin(stream) as _);
            Ok::<_, Infallible>(Response::builder().status(200).body(body).unwrap())
        }
    });
    (svc, calls, alive)
}

/// The caller that started a shared call is dropped while the shared body is being read: the
/// joined caller gets the whole body; when every caller leaves mid-body, the upstream body is
/// dropped and the call leaves the table (coalesce over the whole stack).
/// docs/guides/coalesce.md: "a caller that goes away ... leaves the call to the others; it goes
/// on. When the last caller leaves, the upstream call is dropped ... and it leaves the table".
#[tokio::test(start_paused = true)]
async fn callers_leaving_while_the_shared_body_is_read() {
    let gate = Arc::new(Semaphore::new(0));
    let (http, calls, alive) = gated_body_upstream(gate.clone());
    let (co, ch) = CoalesceLayer::new().pair();
    let client = ClientBuilder::new()
        .with_hedge(HedgeLayer::new())
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_auth(AuthLayer::bearer("t").unwrap())
        .with_version(VersionLayer::header("api-version", "1").unwrap())
        .with_coalesce(co)
        .build(http);
    let leader = tokio::spawn(client.clone().oneshot(get("/doc")));
    settle().await;
    let follower = tokio::spawn(client.clone().oneshot(get("/doc")));
    settle().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(alive.load(Ordering::SeqCst), 1, "the body is being read");
    leader.abort();
    let _ = leader.await;
    settle().await;
    assert_eq!(
        alive.load(Ordering::SeqCst),
        1,
        "the leader's leaving cut the shared body"
    );
    gate.add_permits(1);
    let res = timeout(BOUND, follower)
        .await
        .expect("the follower hung")
        .unwrap()
        .expect("the follower failed");
    let body = timeout(BOUND, res.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"part1part2");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(ch.in_flight(HOST), 0);

    // Every caller leaves mid-body.
    let a = tokio::spawn(client.clone().oneshot(get("/doc2")));
    let b = tokio::spawn(client.clone().oneshot(get("/doc2")));
    settle().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(alive.load(Ordering::SeqCst), 1);
    a.abort();
    b.abort();
    let _ = (a.await, b.await);
    settle().await;
    assert_eq!(
        alive.load(Ordering::SeqCst),
        0,
        "nobody waits, yet the body is still read"
    );
    assert_eq!(
        ch.in_flight(HOST),
        0,
        "a call nobody waits for stayed in the table"
    );
    // The next identical call starts afresh and is answered.
    gate.add_permits(10);
    let res = timeout(BOUND, client.clone().oneshot(get("/doc2")))
        .await
        .unwrap()
        .unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"part1part2");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

// ------------------------------------------------------------------------------------------
// Server side: the idempotency layer and the webhook receiver under tower-http's timeout, and
// clients that go away mid-request, on real sockets.
// ------------------------------------------------------------------------------------------

mod server {
    use super::*;
    use axum::response::IntoResponse;
    use axum::routing::{post as axum_post, post_service};
    use axum::Router;
    use std::net::SocketAddr;
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    use sturdy::webhook::{sign_github, EventQueue, GitHub, Push, WebhookEvent, WebhookReceiver};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tower_http::timeout::TimeoutLayer;

    async fn serve(app: Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (addr, task)
    }

    /// Sends raw bytes and reads the whole answer (the request says `connection: close`).
    async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        let _ = timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    fn request(key: &str, body: &str) -> Vec<u8> {
        format!(
            "POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: {key}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn status_of(answer: &str) -> u16 {
        answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// A client that sends the head and part of the body, then goes away, while the layer reads
    /// the body: nothing ran, and the key stays free (a retry runs at once, not a 409).
    /// docs/guides/idempotency.md: "client gone while the store is locking the key (before the
    /// handler starts) | the handler does not run ... a retry with the same key runs normally".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_gone_mid_body_under_a_timeout_leaves_the_key_free() {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let app = Router::new()
            .route(
                "/orders",
                axum_post(move |body: String| {
                    let r = r.clone();
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        (StatusCode::CREATED, body)
                    }
                }),
            )
            .layer(IdempotencyLayer::new(
                MemoryStore::default(),
                ByCredentials::default(),
            ))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_millis(150),
            ));
        let (addr, task) = serve(app).await;

        // Gone mid-body.
        {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let full = request("k-gone", "0123456789abcdef");
            s.write_all(&full[..full.len() - 8]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(s);
        }
        // Trickled past the timeout: 408 from tower-http, the handler never ran.
        {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let full = request("k-slow", "0123456789abcdef");
            s.write_all(&full[..full.len() - 8]).await.unwrap();
            let mut out = Vec::new();
            let _ = timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            let answer = String::from_utf8_lossy(&out).into_owned();
            assert_eq!(status_of(&answer), 408, "{answer}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        for key in ["k-gone", "k-slow"] {
            let a = raw(addr, &request(key, "0123456789abcdef")).await;
            assert_eq!(status_of(&a), 201, "{key}: {a}");
            let a = raw(addr, &request(key, "0123456789abcdef")).await;
            assert_eq!(status_of(&a), 201, "{key}: {a}");
            assert!(
                a.to_ascii_lowercase().contains("idempotent-replayed: true"),
                "{key}: {a}"
            );
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        task.abort();
    }

    /// A handler cut by tower-http's timeout (above the layer) and a client that disconnects
    /// mid-handler: the first run goes on and commits once; retries get 409 while it runs, then
    /// the stored response; never a second run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_or_abandoned_handler_never_runs_twice() {
        let runs = Arc::new(AtomicUsize::new(0));
        let commits = Arc::new(AtomicUsize::new(0));
        let (r, c) = (runs.clone(), commits.clone());
        let app = Router::new()
            .route(
                "/orders",
                axum_post(move |body: String| {
                    let (r, c) = (r.clone(), c.clone());
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        c.fetch_add(1, Ordering::SeqCst);
                        (StatusCode::CREATED, body)
                    }
                }),
            )
            .layer(IdempotencyLayer::new(
                MemoryStore::default(),
                ByCredentials::default(),
            ))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_millis(100),
            ));
        let (addr, task) = serve(app).await;
        // Cut by the timeout.
        let a = raw(addr, &request("k-cut", "abc")).await;
        assert_eq!(status_of(&a), 408, "{a}");
        // Abandoned by its client.
        {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&request("k-gone", "abc")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            drop(s);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        for key in ["k-cut", "k-gone"] {
            let a = raw(addr, &request(key, "abc")).await;
            assert_eq!(status_of(&a), 409, "{key} while the first run goes on: {a}");
        }
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(
            commits.load(Ordering::SeqCst),
            2,
            "an abandoned run did not finish"
        );
        for key in ["k-cut", "k-gone"] {
            let a = raw(addr, &request(key, "abc")).await;
            assert_eq!(status_of(&a), 201, "{key}: {a}");
            assert!(
                a.to_ascii_lowercase().contains("idempotent-replayed: true"),
                "{a}"
            );
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        task.abort();
    }

    /// The whole stack over a hyper-util client against an axum app on loopback, in real time:
    /// 16 tasks on a kept client under `Buffer(1)`, each call cut by a seeded timeout of 0 to
    /// 60 ms; afterwards nothing is held and twenty calls in a row are answered at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_hyper_on_loopback_cancelled_calls_leave_the_stack_at_rest() {
        let hits = Arc::new(AtomicUsize::new(0));
        let hh = hits.clone();
        let app = Router::new().route(
            "/{*path}",
            axum::routing::any(move |uri: http::Uri| {
                let hh = hh.clone();
                async move {
                    let n = hh.fetch_add(1, Ordering::SeqCst);
                    let ms = if uri.path().starts_with("/slow") {
                        40
                    } else {
                        2
                    };
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    if n % 11 == 5 {
                        (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response()
                    } else {
                        (StatusCode::OK, "ok").into_response()
                    }
                }
            }),
        );
        let (addr, task) = serve(app).await;
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let (rl, limits) = RateLimitLayer::adaptive_only().pair();
        let (ac, conc) = AdaptiveConcurrencyLayer::new().with_limits(2, 4).pair();
        let (co, coal) = CoalesceLayer::new().pair();
        let (hl, _hedge) = HedgeLayer::new()
            .with_min_samples(10)
            .with_delay_bounds(Duration::from_millis(5), Duration::from_millis(30))
            .pair();
        let client = ClientBuilder::new()
            .with_retry(
                RetryLayer::new().with_seed(113).with_backoff(
                    sturdy::retry::Backoff::decorrelated_jitter(
                        Duration::from_millis(2),
                        Duration::from_millis(20),
                    )
                    .unwrap(),
                ),
            )
            .with_hedge(hl)
            .with_rate_limit(rl)
            .with_adaptive_concurrency(ac)
            .with_auth(AuthLayer::bearer("t").unwrap())
            .with_version(VersionLayer::header("api-version", "1").unwrap())
            .with_coalesce(co)
            .with_attempt_timeout(Duration::from_millis(500))
            .build(http);
        let host = format!("127.0.0.1:{}", addr.port());
        let svc = Buffer::new(client, 1);
        let mut set = tokio::task::JoinSet::new();
        for t in 0..16u64 {
            let mut svc = svc.clone();
            let host = host.clone();
            set.spawn(async move {
                let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for i in 0..12u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let path = match x % 4 {
                        0 => "/slow/shared".to_owned(),
                        1 => format!("/slow/{t}/{i}"),
                        2 => "/fast/shared".to_owned(),
                        _ => format!("/fast/{t}/{i}"),
                    };
                    let req = if x % 5 == 0 {
                        Request::post(format!("http://{host}{path}"))
                            .body(Full::from("{}"))
                            .unwrap()
                    } else {
                        Request::get(format!("http://{host}{path}"))
                            .body(Full::default())
                            .unwrap()
                    };
                    let cut = Duration::from_millis((x >> 8) % 60);
                    let _ = tokio::time::timeout(cut, async {
                        let ready = svc.ready().await?;
                        ready.call(req).await
                    })
                    .await;
                }
            });
        }
        timeout(Duration::from_secs(20), async {
            while let Some(r) = set.join_next().await {
                r.unwrap();
            }
        })
        .await
        .expect("the tasks hung");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            conc.state(&host).map(|s| (s.in_flight(), s.waiting())),
            conc.state(&host).map(|_| (0, 0)),
            "permits or places kept"
        );
        assert_eq!(limits.waiting(&host), 0);
        assert_eq!(coal.in_flight(&host), 0);
        let mut svc = svc;
        for i in 0..20 {
            let t0 = tokio::time::Instant::now();
            let r = timeout(
                Duration::from_secs(5),
                svc.ready().await.unwrap().call(
                    Request::get(format!("http://{host}/fast/after/{i}"))
                        .body(Full::default())
                        .unwrap(),
                ),
            )
            .await
            .expect("a call after the storm hung")
            .expect("a call after the storm failed");
            assert!(
                r.status().is_success() || r.status() == 503,
                "{}",
                r.status()
            );
            assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        }
        task.abort();
    }

    fn axum_req(key: &str, body: &'static str) -> Request<axum::body::Body> {
        Request::post("/orders")
            .header("idempotency-key", key)
            .header("content-type", "text/plain")
            .body(axum::body::Body::from(body))
            .unwrap()
    }

    /// Under tower-http's `TimeoutLayer` (paused time, in process): a handler cut by the
    /// timeout keeps running and counts in `running()`; `wait_idle()` resolves only once it has
    /// stored its outcome; one that panics after its client left releases its key, so a retry
    /// runs again. docs/guides/idempotency.md: "If the request's future is dropped, the task goes
    /// on"; "A panic in the handler is caught in its task; the key is released".
    #[tokio::test(start_paused = true)]
    async fn cut_handlers_are_counted_until_settled_and_a_late_panic_frees_the_key() {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let idem = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
        let app = Router::new()
            .route(
                "/orders",
                axum_post(move |body: String| {
                    let r = r.clone();
                    async move {
                        let n = r.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        if body == "panic" && n == 1 {
                            panic!("s113: the handler panicked after its client left");
                        }
                        (StatusCode::CREATED, format!("{body}#{n}"))
                    }
                }),
            )
            .layer(idem.clone())
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_millis(100),
            ));
        let res = app.clone().oneshot(axum_req("k1", "book")).await.unwrap();
        assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            idem.running(),
            1,
            "the cut handler is not counted as running"
        );
        let idle = tokio::spawn({
            let idem = idem.clone();
            async move { idem.wait_idle().await }
        });
        advance(Duration::from_millis(100)).await;
        settle().await;
        assert!(
            !idle.is_finished(),
            "wait_idle resolved while the handler runs"
        );
        let res = app.clone().oneshot(axum_req("k1", "book")).await.unwrap();
        assert_eq!(res.status(), StatusCode::CONFLICT);
        timeout(Duration::from_secs(5), idle)
            .await
            .expect("wait_idle never resolved")
            .unwrap();
        assert_eq!(idem.running(), 0);
        let res = app.clone().oneshot(axum_req("k1", "book")).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(
            res.headers()
                .get("idempotent-replayed")
                .map(|v| v.to_str().unwrap()),
            Some("true")
        );
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"book#0");

        // A late panic (the handler's second run overall, under another key).
        let res = app.clone().oneshot(axum_req("k2", "panic")).await.unwrap();
        assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
        advance(Duration::from_millis(400)).await;
        settle().await;
        assert_eq!(idem.running(), 0);
        let res = timeout(
            Duration::from_secs(5),
            app.clone().oneshot(axum_req("k2", "panic")),
        )
        .await
        .unwrap()
        .unwrap();
        // The retry runs the handler again (it does not panic the second time): after 100 ms
        // the timeout answers, and the run goes on to store its 201.
        assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
        advance(Duration::from_millis(400)).await;
        settle().await;
        let res = app.clone().oneshot(axum_req("k2", "panic")).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"panic#2");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    /// End to end on loopback: the whole client stack over hyper-util, POSTing to an axum app
    /// whose idempotency layer sits under tower-http's `TimeoutLayer` (100 ms) and whose handler
    /// takes 300 ms. The first attempt gets 408 from the timeout while the handler goes on; the
    /// retry (same key) gets 409 with `Retry-After: 1` and waits; the next gets the stored 201.
    /// The caller sees one 201 and the handler ran once. docs/guides/idempotency.md: "When the
    /// server answers 409 with `Retry-After` to a request that carries a key ..., the retry
    /// layer waits and asks again, so the caller gets the stored response."
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_client_rides_out_a_server_timeout_to_the_stored_response() {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let app = Router::new()
            .route(
                "/orders",
                axum_post(move |body: String| {
                    let r = r.clone();
                    async move {
                        let n = r.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        (StatusCode::CREATED, format!("{body}#{n}"))
                    }
                }),
            )
            .layer(IdempotencyLayer::new(
                MemoryStore::default(),
                ByCredentials::default(),
            ))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_millis(100),
            ));
        let (addr, task) = serve(app).await;
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let (co, _) = CoalesceLayer::new().pair();
        let client = ClientBuilder::new()
            .with_retry(
                RetryLayer::new().with_seed(113).with_backoff(
                    sturdy::retry::Backoff::decorrelated_jitter(
                        Duration::from_millis(10),
                        Duration::from_millis(50),
                    )
                    .unwrap(),
                ),
            )
            .with_hedge(HedgeLayer::new())
            .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
            .with_auth(AuthLayer::bearer("t").unwrap())
            .with_version(VersionLayer::header("api-version", "1").unwrap())
            .with_coalesce(co)
            .with_attempt_timeout(Duration::from_secs(2))
            .build(http);
        let req = Request::post(format!("http://{addr}/orders"))
            .body(Full::from("book"))
            .unwrap();
        let res = timeout(Duration::from_secs(10), client.oneshot(req))
            .await
            .expect("the call hung")
            .unwrap_or_else(|e| panic!("the call failed: {e}"));
        let status = res.status();
        let replayed = res.headers().get("idempotent-replayed").cloned();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, StatusCode::CREATED, "{body:?}");
        assert_eq!(&body[..], b"book#0");
        assert_eq!(replayed.as_ref().map(|v| v.to_str().unwrap()), Some("true"));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        task.abort();
    }

    /// A queue whose push takes a while and records what it really queued.
    #[derive(Debug, Clone)]
    struct SlowQ(Arc<SlowQueue>);

    #[derive(Debug, Default)]
    struct SlowQueue {
        queued: Mutex<Vec<String>>,
        delay_ms: u64,
    }

    impl EventQueue for SlowQ {
        fn push(
            &self,
            event: WebhookEvent,
            _ttl: Duration,
        ) -> sturdy::webhook::BoxFuture<Result<Push, BoxError>> {
            let me = self.0.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(me.delay_ms)).await;
                let key = event.dedup_key();
                let mut q = me.queued.lock().unwrap();
                if q.contains(&key) {
                    Ok(Push::Duplicate)
                } else {
                    q.push(key);
                    Ok(Push::Enqueued)
                }
            })
        }
    }

    /// docs: "answers 2xx only once it is queued". Under tower-http's timeout, a delivery whose
    /// push outlasts the timeout gets the timeout's answer, not 2xx; its redelivery is queued
    /// (or found a duplicate of one that was queued): in the end the event is queued once, and
    /// every 2xx came after it was.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_webhook_cut_by_a_timeout_while_queuing_is_never_acknowledged_unqueued() {
        let queue = Arc::new(SlowQueue {
            delay_ms: 200,
            ..Default::default()
        });
        let app = Router::new().route(
            "/hook",
            post_service(
                ServiceBuilder::new()
                    .layer(TimeoutLayer::with_status_code(
                        StatusCode::REQUEST_TIMEOUT,
                        Duration::from_millis(60),
                    ))
                    .service(WebhookReceiver::new(
                        GitHub::new("s3cret").unwrap(),
                        SlowQ(queue.clone()),
                    )),
            ),
        );
        let (addr, task) = serve(app).await;
        let body = r#"{"action":"opened","n":113}"#;
        let sig = sign_github("s3cret", body.as_bytes());
        let req = format!(
            "POST /hook HTTP/1.1\r\nhost: x\r\nx-github-event: issues\r\nx-github-delivery: d-1\r\nx-hub-signature-256: {sig}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let a = raw(addr, req.as_bytes()).await;
        let first = status_of(&a);
        let queued_then = queue.queued.lock().unwrap().len();
        if (200..300).contains(&first) {
            assert_eq!(queued_then, 1, "2xx before the event was queued");
        }
        assert_eq!(first, 408, "{a}");
        // The sender redelivers until it gets 2xx.
        let mut acked = false;
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let a = raw(addr, req.as_bytes()).await;
            let s = status_of(&a);
            if (200..300).contains(&s) {
                acked = true;
                break;
            }
        }
        // With a timeout shorter than every push, no delivery can be acknowledged: the sender
        // is told to redeliver, and what was queued is queued once.
        let q = queue.queued.lock().unwrap().len();
        assert!(q <= 1, "queued {q} times");
        if acked {
            assert_eq!(q, 1, "acknowledged but never queued");
        }
        task.abort();
    }
}
