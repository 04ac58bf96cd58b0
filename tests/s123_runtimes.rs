#![cfg(feature = "full")]
// Runtimes made by the tests themselves cannot share a paused clock: these tests run in real
// time with millisecond settings, and sleep on plain threads only outside any runtime.
#![allow(clippy::disallowed_methods)]
//! Outside round s123: one client, many runtimes and threads. A client (and each layer's shared
//! state) outlives the runtime that first used it: a `static` client used by runtimes made and
//! dropped in turn, runtimes shut down while calls, waits, probes, hedges or coalesced calls were
//! in flight on them, plain OS threads each with a runtime of their own, Redis connections made
//! on a runtime that is gone, and the server-side idempotency layer and webhook receiver built
//! once and served by two runtimes one after the other.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::{any, post};
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::concurrency::Algorithm;
use sturdy::core::BoxError;
use sturdy::hedge::HedgeLayer;
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::version::VersionLayer;
use sturdy::ClientBuilder;
use tokio::runtime::Runtime;
use tokio::time::timeout;
use tower::{Service, ServiceExt};

type Req = Request<Full<Bytes>>;
type Http = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

fn current() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn multi() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The ways a runtime goes away.
fn end(rt: Runtime, how: usize) {
    match how % 3 {
        0 => drop(rt),
        1 => rt.shutdown_background(),
        _ => rt.shutdown_timeout(Duration::from_millis(10)),
    }
}

fn http() -> Http {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

#[derive(Default)]
struct Counts {
    orders: AtomicUsize,
    tokens: AtomicUsize,
    fail: AtomicUsize,
    all: AtomicUsize,
}

/// A server on 127.0.0.1 on a runtime of its own in an OS thread of its own, so it outlives every
/// runtime of the client. Paths: `/ok`, `/slow` (300 ms), `/hang` (10 s), `/fail` (503), `/429`
/// (429 with `Retry-After: 2`), `/bare429`, `/token` (OAuth2), `/orders` (POST, counted).
fn server() -> (SocketAddr, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = multi();
        rt.block_on(async move {
            let app = Router::new()
                .route("/ok", any(|| async { "ok" }))
                .route(
                    "/slow",
                    any(|| async {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        "slow"
                    }),
                )
                .route(
                    "/hang",
                    any(|| async {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        "hang"
                    }),
                )
                .route(
                    "/fail",
                    any(|State(c): State<Arc<Counts>>| async move {
                        c.fail.fetch_add(1, Ordering::SeqCst);
                        (StatusCode::SERVICE_UNAVAILABLE, "down")
                    }),
                )
                .route(
                    "/429",
                    any(|| async {
                        (
                            StatusCode::TOO_MANY_REQUESTS,
                            [("retry-after", "2")],
                            "slow down",
                        )
                    }),
                )
                .route(
                    "/bare429",
                    any(|| async { (StatusCode::TOO_MANY_REQUESTS, "slow down") }),
                )
                .route(
                    "/token",
                    post(|State(c): State<Arc<Counts>>| async move {
                        let n = c.tokens.fetch_add(1, Ordering::SeqCst) + 1;
                        (
                            [("content-type", "application/json")],
                            format!(
                                r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":3600}}"#
                            ),
                        )
                    }),
                )
                .route(
                    "/orders",
                    post(|State(c): State<Arc<Counts>>| async move {
                        c.orders.fetch_add(1, Ordering::SeqCst);
                        (StatusCode::CREATED, "created")
                    }),
                )
                .layer(axum::middleware::from_fn_with_state(
                    c.clone(),
                    |State(c): State<Arc<Counts>>,
                     req: axum::extract::Request,
                     next: axum::middleware::Next| async move {
                        c.all.fetch_add(1, Ordering::SeqCst);
                        next.run(req).await
                    },
                ))
                .with_state(c);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (rx.recv().unwrap(), counts)
}

fn get(addr: SocketAddr, path: &str) -> Req {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap()
}

fn post_order(addr: SocketAddr) -> Req {
    Request::post(format!("http://{addr}/orders"))
        .body(Full::from(r#"{"item":"book"}"#))
        .unwrap()
}

/// Every option on, around a hyper-util client to `addr`.
fn full_client(
    addr: SocketAddr,
) -> sturdy::Client<sturdy::coalesce::ResponseBody<hyper::body::Incoming>> {
    let h = http();
    let tokens = ClientCredentials::new(
        h.clone(),
        &format!("http://{addr}/token"),
        "s123-client",
        "s123-secret",
    )
    .unwrap();
    ClientBuilder::new()
        .with_idempotency(IdempotencyKeyLayer::new())
        .with_retry(
            RetryLayer::new()
                .with_deadline(Duration::from_secs(3))
                .with_seed(123),
        )
        .with_hedge(
            HedgeLayer::new()
                .with_min_samples(5)
                .with_delay_bounds(Duration::from_millis(20), Duration::from_millis(100)),
        )
        .with_circuit_breaker(CircuitBreakerLayer::new())
        .with_rate_limit(RateLimitLayer::new(
            Quota::per_second(1000).unwrap().with_burst(100).unwrap(),
        ))
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_auth(AuthLayer::oauth2(tokens))
        .with_version(VersionLayer::header("api-version", "2026-01-01").unwrap())
        .with_coalesce(CoalesceLayer::new())
        .with_attempt_timeout(Duration::from_secs(2))
        .build(h)
}

async fn status_of<S, B>(svc: S, req: Req) -> Result<StatusCode, String>
where
    S: Service<Req, Response = Response<B>, Error = BoxError>,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    match timeout(Duration::from_secs(3), svc.oneshot(req)).await {
        Err(_) => Err("hung for 3 s".into()),
        Ok(Err(e)) => Err(format!("{e} / {e:?}")),
        Ok(Ok(res)) => {
            let s = res.status();
            let _ = timeout(Duration::from_secs(3), res.into_body().collect()).await;
            Ok(s)
        }
    }
}

fn assert_send_sync_clone<T: Clone + Send + Sync + 'static>(_: &T) {}
fn assert_send<T: Send>(_: &T) {}

// ---------------------------------------------------------------------------------------------
// Shared client in a static, runtimes one after the other.

static SHARED: LazyLock<(SocketAddr, Arc<Counts>)> = LazyLock::new(server);
static CLIENT: LazyLock<sturdy::Client<sturdy::coalesce::ResponseBody<hyper::body::Incoming>>> =
    LazyLock::new(|| full_client(SHARED.0));

/// A `static` client with every option on, used by six runtimes in turn (each made, used and
/// dropped, shut down in the background or with a timeout), as `#[tokio::test]`s do: every call
/// on every runtime succeeds at once, GETs, coalesced GETs and POSTs alike, with one token.
#[test]
fn a_static_full_client_works_on_runtimes_made_and_dropped_in_turn() {
    let addr = SHARED.0;
    for i in 0..6 {
        let rt = if i % 2 == 0 { current() } else { multi() };
        rt.block_on(async {
            let started = Instant::now();
            assert_eq!(
                status_of(CLIENT.clone(), get(addr, "/ok")).await,
                Ok(StatusCode::OK),
                "runtime {i}"
            );
            assert_eq!(
                status_of(CLIENT.clone(), post_order(addr)).await,
                Ok(StatusCode::CREATED),
                "runtime {i}"
            );
            let calls: Vec<_> = (0..5)
                .map(|_| tokio::spawn(status_of(CLIENT.clone(), get(addr, "/ok"))))
                .collect();
            for c in calls {
                assert_eq!(c.await.unwrap(), Ok(StatusCode::OK), "runtime {i}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "runtime {i}: {:?}",
                started.elapsed()
            );
        });
        end(rt, i);
    }
    assert_eq!(
        SHARED.1.tokens.load(Ordering::SeqCst),
        1,
        "one token for every runtime"
    );
}

/// The built client, its futures and every handle are `Clone + Send + Sync + 'static` / `Send`.
#[test]
fn the_client_every_handle_and_the_futures_are_send_sync_static() {
    let (addr, _) = *SHARED;
    let client = CLIENT.clone();
    assert_send_sync_clone(&client);
    let fut = client.clone().oneshot(get(addr, "/ok"));
    assert_send(&fut);
    drop(fut);
    let (_, rh) = RateLimitLayer::adaptive_only().pair();
    let (_, ch) = CircuitBreakerLayer::new().pair();
    let (_, ah) = AdaptiveConcurrencyLayer::new().pair();
    let (_, hh) = HedgeLayer::new().pair();
    let (_, coh) = CoalesceLayer::new().pair();
    assert_send_sync_clone(&rh);
    assert_send_sync_clone(&ch);
    assert_send_sync_clone(&ah);
    assert_send_sync_clone(&hh);
    assert_send_sync_clone(&coh);
}

/// Four plain OS threads, each with a current-thread runtime of its own, and a multi-thread
/// runtime beside them, all use one client at once: every call succeeds.
#[test]
fn plain_threads_each_with_a_runtime_share_one_client() {
    let (addr, _) = server();
    let client = full_client(addr);
    let threads: Vec<_> = (0..5)
        .map(|t| {
            let client = client.clone();
            std::thread::spawn(move || {
                let rt = if t == 4 { multi() } else { current() };
                let out = rt.block_on(async move {
                    let calls: Vec<_> = (0..8)
                        .map(|i| {
                            let path = if i % 2 == 0 { "/ok" } else { "/slow" };
                            tokio::spawn(status_of(client.clone(), get(addr, path)))
                        })
                        .collect();
                    let mut out = Vec::new();
                    for c in calls {
                        out.push(c.await.unwrap());
                    }
                    out
                });
                end(rt, t);
                out
            })
        })
        .collect();
    for t in threads {
        for r in t.join().unwrap() {
            assert_eq!(r, Ok(StatusCode::OK));
        }
    }
}

/// A server whose `/stall-once/...` paths (any method) each hold their first request for good,
/// saying on the channel when it arrived, and answer every later one at once; `/ok` answers.
/// Counts every `/stall-once` request.
fn stall_once_server() -> (SocketAddr, std::sync::mpsc::Receiver<()>, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let (arrived_tx, arrived) = std::sync::mpsc::channel();
    let arrived_tx = Arc::new(std::sync::Mutex::new(arrived_tx));
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        multi().block_on(async move {
            let app = Router::new().route("/ok", any(|| async { "ok" })).route(
                "/stall-once/{name}",
                any(move |uri: http::Uri| async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    let first = seen.lock().unwrap().insert(uri.path().to_owned());
                    if first {
                        let _ = arrived_tx.lock().unwrap().send(());
                        std::future::pending::<()>().await;
                    }
                    "again"
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (rx.recv().unwrap(), arrived, hits)
}

/// A client kept across runtimes takes, on runtime B, the pooled connection runtime A made; A
/// shuts down while the connection's task holds the request (hyper: "runtime dropped the
/// dispatch task"). The connection is gone as by a reset: the default stack sends the GET, and
/// a POST with its idempotency key, again on a new connection, and both succeed.
#[test]
fn a_call_on_a_pooled_connection_dropped_with_its_runtime_goes_again_on_a_new_one() {
    let (addr, mut arrived, hits) = stall_once_server();
    let client = ClientBuilder::new().build(http());
    for (i, method) in ["GET", "POST"].into_iter().enumerate() {
        // Runtime A makes the connection and leaves it idle in the pool, its task on A.
        let a = multi();
        assert_eq!(
            a.block_on(status_of(client.clone(), get(addr, "/ok"))),
            Ok(StatusCode::OK)
        );
        std::thread::sleep(Duration::from_millis(50));
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}/stall-once/{method}"))
            .body(Full::from("x"))
            .unwrap();
        let b = current();
        let arrived = &mut arrived;
        let result = std::thread::scope(|s| {
            // A goes away once the server holds the request A's connection task wrote.
            s.spawn(move || {
                let _ = arrived.recv_timeout(Duration::from_secs(5));
                end(a, i + 1);
            });
            b.block_on(status_of(client.clone(), req))
        });
        assert_eq!(result, Ok(StatusCode::OK), "{method}");
        assert_eq!(hits.load(Ordering::SeqCst), 2 * (i + 1), "{method}");
    }
}

// ---------------------------------------------------------------------------------------------
// In-process services, gated by a runtime-agnostic `watch` channel.

type Res = Response<Full<Bytes>>;

#[derive(Clone)]
struct Gate(Arc<tokio::sync::watch::Sender<bool>>);

impl Gate {
    fn new() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(false).0))
    }
    fn open(&self) {
        self.0.send_replace(true);
    }
    async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// A service that answers `/wait` once the gate is open, `/fail` with 503, `/429` with
/// `Retry-After: 2`, `/bare429` with a bare 429, and anything else at once with 200; counts
/// every call.
fn gated(
    gate: Gate,
    hits: Arc<AtomicUsize>,
) -> impl Service<Req, Response = Res, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Req| {
        let gate = gate.clone();
        let n = hits.fetch_add(1, Ordering::SeqCst);
        async move {
            let path = req.uri().path().to_owned();
            let res = match path.as_str() {
                "/wait" => {
                    gate.wait().await;
                    Response::new(Full::from("waited"))
                }
                "/fail" => Response::builder()
                    .status(503)
                    .body(Full::from("down"))
                    .unwrap(),
                "/429" => Response::builder()
                    .status(429)
                    .header("retry-after", "2")
                    .body(Full::default())
                    .unwrap(),
                "/bare429" => Response::builder()
                    .status(429)
                    .body(Full::default())
                    .unwrap(),
                "/flaky" if n == 0 => Response::builder()
                    .status(503)
                    .body(Full::default())
                    .unwrap(),
                _ => Response::new(Full::from("ok")),
            };
            Ok::<_, BoxError>(res)
        }
    })
}

fn at(path: &str) -> Req {
    Request::get(format!("http://svc.s123.test{path}"))
        .body(Full::default())
        .unwrap()
}

/// Runs `f` on a fresh multi-thread runtime in another OS thread; the result comes back on the
/// returned channel.
fn on_other_thread<F, T>(f: F) -> std::sync::mpsc::Receiver<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

fn follower_on_b<S>(svc: S, req: Req) -> std::sync::mpsc::Receiver<Result<StatusCode, String>>
where
    S: Service<
            Req,
            Response = Response<sturdy::coalesce::ResponseBody<Full<Bytes>>>,
            Error = BoxError,
        > + Send
        + 'static,
    S::Future: Send,
{
    on_other_thread(move || {
        let rt = multi();
        let r = rt.block_on(status_of(svc, req));
        drop(rt);
        r
    })
}

/// Coalescing alone: a leader on runtime A and a follower on runtime B (another OS thread) share
/// one call; A goes away (each of the three ways) while the call is in flight. The guide: "a
/// caller that goes away ... leaves the call to the others; it goes on." The follower gets the
/// answer, and a fresh call on B works.
#[test]
fn a_coalesced_call_led_from_a_dropped_runtime_goes_on_for_a_follower_on_another() {
    for how in 0..3 {
        let gate = Gate::new();
        let hits = Arc::new(AtomicUsize::new(0));
        let (layer, handle) = CoalesceLayer::new().pair();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(gated(gate.clone(), hits.clone()));
        let a = current();
        let leader = a.spawn(status_of(svc.clone(), at("/wait")));
        a.block_on(async {
            while hits.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        });
        let follower = follower_on_b(svc.clone(), at("/wait"));
        let t = Instant::now();
        while handle.stats().joined() == 0 && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            handle.stats().joined(),
            1,
            "way {how}: the follower did not join"
        );
        end(a, how);
        drop(leader);
        gate.open();
        let r = follower
            .recv_timeout(Duration::from_secs(5))
            .expect("the follower's thread died or hung");
        assert_eq!(r, Ok(StatusCode::OK), "way {how}");
        let b = current();
        assert_eq!(
            b.block_on(status_of(svc, at("/x"))),
            Ok(StatusCode::OK),
            "way {how}"
        );
    }
}

/// Coalescing alone over a hyper-util client (no timer below it): the leader's connection task
/// runs on A, so when A goes away hyper fails the call ("runtime dropped the dispatch task");
/// the follower on B sends its own request there (counted in `fallbacks`) and gets the answer.
#[test]
fn a_coalesced_hyper_call_whose_connection_died_with_the_leaders_runtime_is_sent_again() {
    let (addr, counts) = server();
    for how in 0..3 {
        let (layer, handle) = CoalesceLayer::new().pair();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .map_err(Into::<BoxError>::into)
            .service(http());
        let before = counts.all.load(Ordering::SeqCst);
        let a = current();
        let leader = a.spawn(status_of(svc.clone(), get(addr, "/slow")));
        a.block_on(async {
            while counts.all.load(Ordering::SeqCst) == before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let s = svc.clone();
        let follower = on_other_thread(move || {
            let rt = multi();
            let r = rt.block_on(status_of(s, get(addr, "/slow")));
            drop(rt);
            r
        });
        let t = Instant::now();
        while handle.stats().joined() == 0 && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            handle.stats().joined(),
            1,
            "way {how}: the follower did not join"
        );
        end(a, how);
        drop(leader);
        let r = follower
            .recv_timeout(Duration::from_secs(5))
            .expect("the follower's thread died or hung");
        assert_eq!(r, Ok(StatusCode::OK), "way {how}");
        assert_eq!(handle.stats().fallbacks(), 1, "way {how}");
    }
}

/// The same through the whole client (every layer's timers armed on A: attempt timeout, deadline,
/// hedge): the follower on B gets the shared answer once A is gone, no panic.
#[test]
fn a_coalesced_call_through_the_full_client_survives_its_leaders_runtime() {
    for how in 0..3 {
        let gate = Gate::new();
        let hits = Arc::new(AtomicUsize::new(0));
        let (co, handle) = CoalesceLayer::new().pair();
        let client = ClientBuilder::new()
            .with_retry(
                RetryLayer::new()
                    .with_deadline(Duration::from_secs(3))
                    .with_seed(1),
            )
            .with_hedge(HedgeLayer::new())
            .with_rate_limit(RateLimitLayer::new(Quota::per_second(1000).unwrap()))
            .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
            .with_auth(AuthLayer::bearer("s123-token").unwrap())
            .with_version(VersionLayer::header("api-version", "1").unwrap())
            .with_coalesce(co)
            .with_attempt_timeout(Duration::from_secs(2))
            .build(gated(gate.clone(), hits.clone()));
        let a = current();
        let leader = a.spawn(status_of(client.clone(), at("/wait")));
        a.block_on(async {
            while hits.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        });
        let follower = follower_on_b(client.clone(), at("/wait"));
        let t = Instant::now();
        while handle.stats().joined() == 0 && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            handle.stats().joined(),
            1,
            "way {how}: the follower did not join"
        );
        end(a, how);
        drop(leader);
        gate.open();
        let r = follower
            .recv_timeout(Duration::from_secs(5))
            .expect("the follower's thread died (a panic?) or hung");
        assert_eq!(r, Ok(StatusCode::OK), "way {how}");
        let b = current();
        assert_eq!(
            b.block_on(status_of(client, at("/x"))),
            Ok(StatusCode::OK),
            "way {how}"
        );
    }
}

/// Rate limit alone, quota 1 per 300 ms: one call takes the slot on A, two more wait in line on
/// A; A goes away. On B the line is empty and the next call goes within one interval (the
/// dropped waiters left the line).
#[test]
fn rate_limit_waiters_on_a_dead_runtime_leave_the_line() {
    for how in 0..3 {
        let (layer, handle) =
            RateLimitLayer::new(Quota::new(1, Duration::from_millis(300)).unwrap()).pair();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(gated(Gate::new(), Arc::new(AtomicUsize::new(0))));
        let a = current();
        let t0 = Instant::now();
        a.block_on(async {
            assert_eq!(status_of(svc.clone(), at("/x")).await, Ok(StatusCode::OK));
            for _ in 0..2 {
                tokio::spawn(status_of(svc.clone(), at("/x")));
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert_eq!(handle.waiting("svc.s123.test"), 2, "way {how}");
        });
        end(a, how);
        let b = multi();
        let r = b.block_on(async {
            assert_eq!(
                handle.waiting("svc.s123.test"),
                0,
                "way {how}: dead waiters still in line"
            );
            status_of(svc.clone(), at("/x")).await
        });
        assert_eq!(r, Ok(StatusCode::OK), "way {how}");
        assert!(
            t0.elapsed() < Duration::from_millis(550),
            "way {how}: the call on B waited behind dead waiters: {:?}",
            t0.elapsed()
        );
    }
}

/// A pause learned from `429` + `Retry-After: 2` on A holds on B after A is gone: a call with
/// `max_wait` zero is refused at once with `RateLimited`.
#[test]
fn a_pause_learned_on_one_runtime_holds_on_the_next() {
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = tower::ServiceBuilder::new()
        .layer(layer.with_max_wait(Duration::ZERO))
        .service(gated(Gate::new(), Arc::new(AtomicUsize::new(0))));
    let a = current();
    assert_eq!(
        a.block_on(status_of(svc.clone(), at("/429"))),
        Ok(StatusCode::TOO_MANY_REQUESTS)
    );
    drop(a);
    let b = current();
    b.block_on(async {
        let p = handle
            .pause("svc.s123.test")
            .expect("the pause was lost with its runtime");
        assert!(
            p > Duration::from_millis(1500) && p <= Duration::from_secs(2),
            "{p:?}"
        );
        let t = Instant::now();
        let e = timeout(Duration::from_secs(1), svc.clone().oneshot(at("/x")))
            .await
            .expect("hung")
            .expect_err("a paused key let a call through");
        assert!(
            sturdy::core::find::<sturdy::core::RateLimited>(&*e).is_some(),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_millis(300));
    });
}

/// A pace learned from bare 429s on A is still there on B.
#[test]
fn a_pace_learned_from_bare_429s_carries_over() {
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_default_pause(Duration::from_millis(80))
        .pair();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(gated(Gate::new(), Arc::new(AtomicUsize::new(0))));
    let a = current();
    a.block_on(async {
        assert_eq!(
            status_of(svc.clone(), at("/bare429")).await,
            Ok(StatusCode::TOO_MANY_REQUESTS)
        );
    });
    let pace = handle.learned_pace("svc.s123.test");
    assert_eq!(
        pace,
        Some(Duration::from_millis(10)),
        "one eighth of the 80 ms pause"
    );
    end(a, 1);
    let b = multi();
    b.block_on(async {
        assert_eq!(handle.learned_pace("svc.s123.test"), pace);
        assert_eq!(status_of(svc.clone(), at("/x")).await, Ok(StatusCode::OK));
    });
}

/// A call waiting out a pause on A when A goes away: on B nothing waits, and once the pause is
/// cleared through the handle a call goes at once.
#[test]
fn a_call_waiting_out_a_pause_on_a_dead_runtime_holds_nothing() {
    for how in 0..3 {
        let (layer, handle) = RateLimitLayer::adaptive_only().pair();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(gated(Gate::new(), Arc::new(AtomicUsize::new(0))));
        let a = current();
        a.block_on(async {
            assert_eq!(
                status_of(svc.clone(), at("/429")).await,
                Ok(StatusCode::TOO_MANY_REQUESTS)
            );
            for _ in 0..3 {
                tokio::spawn(status_of(svc.clone(), at("/x")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(handle.waiting("svc.s123.test"), 3);
        });
        end(a, how);
        let b = current();
        b.block_on(async {
            assert_eq!(handle.waiting("svc.s123.test"), 0, "way {how}");
            assert!(handle.clear_pause("svc.s123.test").is_some());
            let t = Instant::now();
            assert_eq!(status_of(svc.clone(), at("/x")).await, Ok(StatusCode::OK));
            assert!(
                t.elapsed() < Duration::from_millis(400),
                "way {how}: {:?}",
                t.elapsed()
            );
        });
    }
}

/// Leader on A, follower on B (another OS thread), A goes away mid-call, the gate opens: the
/// follower's result.
fn coalesced_across_runtimes<S>(
    svc: S,
    gate: &Gate,
    hits: &AtomicUsize,
    handle: &sturdy::coalesce::CoalesceHandle,
    how: usize,
    path: &str,
) -> Result<StatusCode, String>
where
    S: Service<
            Req,
            Response = Response<sturdy::coalesce::ResponseBody<Full<Bytes>>>,
            Error = BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let a = current();
    let leader = a.spawn(status_of(svc.clone(), at(path)));
    a.block_on(async {
        while hits.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    });
    let follower = follower_on_b(svc, at(path));
    let t = Instant::now();
    while handle.stats().joined() == 0 && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(handle.stats().joined(), 1, "the follower did not join");
    std::thread::sleep(Duration::from_millis(30));
    end(a, how);
    drop(leader);
    // The follower now drives the shared call on B, before the answer comes.
    std::thread::sleep(Duration::from_millis(100));
    gate.open();
    follower
        .recv_timeout(Duration::from_secs(5))
        .expect("the follower's thread died or hung")
}

/// Coalescing over the retry layer with a deadline: the deadline's timer is armed on the
/// leader's runtime A; the follower on B polls the shared call after A is gone.
#[test]
fn coalesce_over_a_retry_deadline_survives_the_leaders_runtime() {
    for how in 0..3 {
        let gate = Gate::new();
        let hits = Arc::new(AtomicUsize::new(0));
        let (co, handle) = CoalesceLayer::new().pair();
        let svc = tower::ServiceBuilder::new()
            .layer(co)
            .map_err(Into::<BoxError>::into)
            .layer(RetryLayer::new().with_deadline(Duration::from_secs(3)))
            .service(gated(gate.clone(), hits.clone()));
        let r = coalesced_across_runtimes(svc, &gate, &hits, &handle, how, "/wait");
        assert_eq!(r, Ok(StatusCode::OK), "way {how}");
    }
}

/// Coalescing over `AttemptTimeoutLayer` (the `ClientBuilder` default puts a 30 s one in every
/// client): the follower gets the answer.
#[test]
fn coalesce_over_an_attempt_timeout_survives_the_leaders_runtime() {
    for how in 0..3 {
        let gate = Gate::new();
        let hits = Arc::new(AtomicUsize::new(0));
        let (co, handle) = CoalesceLayer::new().pair();
        let svc = tower::ServiceBuilder::new()
            .layer(co)
            .map_err(Into::<BoxError>::into)
            .layer(sturdy::retry::AttemptTimeoutLayer::new(Some(
                Duration::from_secs(2),
            )))
            .service(gated(gate.clone(), hits.clone()));
        let r = coalesced_across_runtimes(svc, &gate, &hits, &handle, how, "/wait");
        assert_eq!(r, Ok(StatusCode::OK), "way {how}");
    }
}

/// The builder with its defaults (a 30 s attempt timeout, no deadline) plus coalescing: the
/// follower gets the answer.
#[test]
fn default_client_with_coalesce_survives_the_leaders_runtime() {
    for how in 0..3 {
        let gate = Gate::new();
        let hits = Arc::new(AtomicUsize::new(0));
        let (co, handle) = CoalesceLayer::new().pair();
        let client = ClientBuilder::new()
            .with_coalesce(co)
            .build(gated(gate.clone(), hits.clone()));
        let r = coalesced_across_runtimes(client, &gate, &hits, &handle, how, "/wait");
        assert_eq!(r, Ok(StatusCode::OK), "way {how}");
    }
}

/// Coalescing over the retry layer (no deadline), the shared call in its backoff sleep (armed on
/// A, after a 503) when A goes away: the follower on B gets the retried answer.
#[test]
fn coalesce_over_a_retry_backoff_survives_the_leaders_runtime() {
    for how in 0..3 {
        let gate = Gate::new();
        let hits = Arc::new(AtomicUsize::new(0));
        let (co, handle) = CoalesceLayer::new().pair();
        let svc = tower::ServiceBuilder::new()
            .layer(co)
            .map_err(Into::<BoxError>::into)
            .layer(
                RetryLayer::new()
                    .with_backoff(
                        sturdy::retry::Backoff::exponential(
                            Duration::from_millis(300),
                            Duration::from_millis(300),
                        )
                        .unwrap(),
                    )
                    .with_seed(7),
            )
            .service(gated(gate.clone(), hits.clone()));
        let r = coalesced_across_runtimes(svc, &gate, &hits, &handle, how, "/flaky");
        assert_eq!(r, Ok(StatusCode::OK), "way {how}");
        assert_eq!(hits.load(Ordering::SeqCst), 2, "way {how}");
    }
}

// ---------------------------------------------------------------------------------------------
// Breaker, concurrency, hedge: state and slots across runtimes.

/// A breaker opened on A (two 503s in a row) is still open on B after A is gone: a call fails at
/// once with `CircuitOpen`; after the open period a probe on B closes it.
#[test]
fn an_open_breaker_carries_over_and_its_probe_runs_on_the_next_runtime() {
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_open_duration(Duration::from_millis(200), Duration::from_secs(1))
        .pair();
    let hits = Arc::new(AtomicUsize::new(0));
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .map_err(Into::<BoxError>::into)
        .service(gated(Gate::new(), hits.clone()));
    let a = current();
    a.block_on(async {
        for _ in 0..2 {
            assert_eq!(
                status_of(svc.clone(), at("/fail")).await,
                Ok(StatusCode::SERVICE_UNAVAILABLE)
            );
        }
    });
    drop(a);
    assert!(
        matches!(
            handle.state("svc.s123.test"),
            Some(CircuitState::Open { .. })
        ),
        "{:?}",
        handle.state("svc.s123.test")
    );
    let b = multi();
    b.block_on(async {
        let e = svc
            .clone()
            .oneshot(at("/x"))
            .await
            .expect_err("an open breaker let a call through");
        assert!(
            sturdy::core::find::<sturdy::core::CircuitOpen>(&*e).is_some(),
            "{e}"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(status_of(svc.clone(), at("/x")).await, Ok(StatusCode::OK));
        assert_eq!(handle.state("svc.s123.test"), Some(CircuitState::Closed));
    });
}

/// A half-open probe in flight on A when A goes away (each way): its slot comes back, so the
/// next call on B is the probe and closes the breaker.
#[test]
fn a_probe_in_flight_on_a_dead_runtime_gives_its_slot_back() {
    for how in 0..3 {
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .with_open_duration(Duration::from_millis(50), Duration::from_secs(1))
            .pair();
        let hits = Arc::new(AtomicUsize::new(0));
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .map_err(Into::<BoxError>::into)
            .service(gated(Gate::new(), hits.clone()));
        let a = current();
        a.block_on(async {
            assert_eq!(
                status_of(svc.clone(), at("/fail")).await,
                Ok(StatusCode::SERVICE_UNAVAILABLE)
            );
            tokio::time::sleep(Duration::from_millis(70)).await;
            tokio::spawn(status_of(svc.clone(), at("/wait")));
            while hits.load(Ordering::SeqCst) < 2 {
                tokio::task::yield_now().await;
            }
            let e = svc
                .clone()
                .oneshot(at("/x"))
                .await
                .expect_err("two probes at once");
            assert!(
                sturdy::core::find::<sturdy::core::CircuitOpen>(&*e).is_some(),
                "{e}"
            );
        });
        end(a, how);
        let b = current();
        b.block_on(async {
            assert_eq!(
                status_of(svc.clone(), at("/x")).await,
                Ok(StatusCode::OK),
                "way {how}"
            );
            assert_eq!(
                handle.state("svc.s123.test"),
                Some(CircuitState::Closed),
                "way {how}"
            );
        });
    }
}

/// Adaptive concurrency pinned to 1: a call holds the permit on A and another waits for it; A
/// goes away. On B nothing is in flight or waiting and a call gets the permit at once.
#[test]
fn a_concurrency_permit_held_on_a_dead_runtime_comes_back() {
    for how in 0..3 {
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_algorithm(Algorithm::Aimd)
            .with_limits(1, 1)
            .with_initial_limit(1)
            .with_max_wait(Duration::from_secs(2))
            .pair();
        let hits = Arc::new(AtomicUsize::new(0));
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .map_err(Into::<BoxError>::into)
            .service(gated(Gate::new(), hits.clone()));
        let a = current();
        a.block_on(async {
            tokio::spawn(status_of(svc.clone(), at("/wait")));
            while hits.load(Ordering::SeqCst) < 1 {
                tokio::task::yield_now().await;
            }
            tokio::spawn(status_of(svc.clone(), at("/x")));
            tokio::time::sleep(Duration::from_millis(20)).await;
            let st = handle.state("svc.s123.test").unwrap();
            assert_eq!((st.in_flight(), st.waiting()), (1, 1));
        });
        end(a, how);
        let b = multi();
        b.block_on(async {
            let st = handle.state("svc.s123.test").unwrap();
            assert_eq!((st.in_flight(), st.waiting()), (0, 0), "way {how}");
            let t = Instant::now();
            assert_eq!(
                status_of(svc.clone(), at("/x")).await,
                Ok(StatusCode::OK),
                "way {how}"
            );
            assert!(
                t.elapsed() < Duration::from_millis(400),
                "way {how}: {:?}",
                t.elapsed()
            );
        });
    }
}

/// A hedged GET (both copies in flight) on A when A goes away: on B calls work, are hedged
/// again, and the hedge's samples and delay carried over.
#[test]
fn a_hedge_in_flight_on_a_dead_runtime_leaves_the_host_working() {
    for how in 0..3 {
        let (layer, handle) = HedgeLayer::new()
            .with_min_samples(5)
            .with_delay_bounds(Duration::from_millis(10), Duration::from_millis(20))
            .with_budget(1.0, 10)
            .unwrap()
            .pair();
        let hits = Arc::new(AtomicUsize::new(0));
        let gate = Gate::new();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .map_err(Into::<BoxError>::into)
            .service(gated(gate.clone(), hits.clone()));
        let a = current();
        a.block_on(async {
            for _ in 0..20 {
                assert_eq!(status_of(svc.clone(), at("/x")).await, Ok(StatusCode::OK));
            }
            tokio::spawn(status_of(svc.clone(), at("/wait")));
            tokio::time::sleep(Duration::from_millis(60)).await;
        });
        let stats = handle.stats("svc.s123.test").unwrap();
        assert_eq!(stats.hedges(), 1, "way {how}: the slow call was not hedged");
        assert_eq!(hits.load(Ordering::SeqCst), 22);
        end(a, how);
        let b = current();
        b.block_on(async {
            assert_eq!(
                status_of(svc.clone(), at("/x")).await,
                Ok(StatusCode::OK),
                "way {how}"
            );
            let s = handle.stats("svc.s123.test").unwrap();
            assert!(s.delay().is_some(), "way {how}");
            let gate2 = gate.clone();
            let slow = tokio::spawn(status_of(svc.clone(), at("/wait")));
            tokio::time::sleep(Duration::from_millis(60)).await;
            gate2.open();
            assert_eq!(slow.await.unwrap(), Ok(StatusCode::OK), "way {how}");
            assert_eq!(
                handle.stats("svc.s123.test").unwrap().hedges(),
                2,
                "way {how}"
            );
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Auth: a waiter on B while the token request runs on A, which goes away.

/// A token request started by a caller on A (the endpoint never answers it); a caller on B
/// (another thread) waits for the same token; A goes away (each way). The caller on B is not
/// left waiting on a request nobody drives: it gets a token from a new request within a second.
#[test]
fn a_caller_waiting_on_b_for_a_token_fetch_lost_with_a_moves_to_a_new_one() {
    for how in 0..3 {
        let fetches = Arc::new(AtomicUsize::new(0));
        let endpoint = {
            let fetches = fetches.clone();
            tower::service_fn(move |_req: Req| {
                let n = fetches.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, BoxError>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::<Bytes>::from(
                                r#"{"access_token":"tok-2","token_type":"Bearer","expires_in":3600}"#,
                            ))
                            .unwrap(),
                    )
                }
            })
        };
        let tokens =
            ClientCredentials::new(endpoint, "http://auth.s123.test/token", "id", "secret")
                .unwrap();
        let client = ClientBuilder::new()
            .with_auth(AuthLayer::oauth2(tokens))
            .with_attempt_timeout(Duration::from_secs(3))
            .build(gated(Gate::new(), Arc::new(AtomicUsize::new(0))));
        let a = current();
        let first = a.spawn(status_of(client.clone(), at("/x")));
        a.block_on(async {
            while fetches.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        });
        let c = client.clone();
        let waiter = on_other_thread(move || {
            let rt = multi();
            let t = Instant::now();
            let r = rt.block_on(status_of(c, at("/x")));
            (r, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        end(a, how);
        drop(first);
        let (r, took) = waiter
            .recv_timeout(Duration::from_secs(6))
            .expect("the waiter hung");
        assert_eq!(r, Ok(StatusCode::OK), "way {how}");
        assert!(
            took < Duration::from_millis(1000),
            "way {how}: the waiter took {took:?}"
        );
        assert_eq!(fetches.load(Ordering::SeqCst), 2, "way {how}");
    }
}

// ---------------------------------------------------------------------------------------------
// Server side: one idempotency layer and one webhook receiver, two runtimes in turn.

use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::webhook::{MemoryQueue, MemoryReceiver, Stripe, WebhookReceiver};

struct ServerSide {
    app: Router,
    handled: Arc<AtomicUsize>,
    layer: IdempotencyLayer<MemoryStore>,
    events: std::sync::Mutex<MemoryReceiver>,
}

fn server_side() -> ServerSide {
    let handled = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_require_key(true)
        .with_lease(Duration::from_millis(150))
        .unwrap();
    let (queue, events) = MemoryQueue::new(100);
    let h = handled.clone();
    let orders = Router::new()
        .route(
            "/orders",
            post(move |body: String| {
                let h = h.clone();
                async move {
                    let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == 1 && body.contains("hang") {
                        std::future::pending::<()>().await;
                    }
                    (StatusCode::CREATED, format!("order {n}"))
                }
            }),
        )
        .route_layer(layer.clone());
    let hooks = Router::new().route(
        "/hooks",
        axum::routing::post_service(WebhookReceiver::new(
            Stripe::new("whsec_s123").unwrap(),
            queue,
        )),
    );
    ServerSide {
        app: orders.merge(hooks),
        handled,
        layer,
        events: std::sync::Mutex::new(events),
    }
}

static SERVER_SIDE: LazyLock<ServerSide> = LazyLock::new(server_side);

async fn send(app: &Router, req: Request<axum::body::Body>) -> (StatusCode, String) {
    let res = timeout(Duration::from_secs(3), app.clone().oneshot(req))
        .await
        .expect("the app hung")
        .unwrap();
    let s = res.status();
    let b = res.into_body().collect().await.unwrap().to_bytes();
    (s, String::from_utf8_lossy(&b).into_owned())
}

fn order(key: &str, body: &str) -> Request<axum::body::Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .header("content-type", "text/plain")
        .body(axum::body::Body::from(body.to_owned()))
        .unwrap()
}

fn stripe_delivery(id: &str) -> Request<axum::body::Body> {
    let body = format!(r#"{{"id":"{id}","type":"payment_intent.succeeded"}}"#);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let sig = sturdy::webhook::sign_stripe("whsec_s123", t, body.as_bytes());
    Request::post("/hooks")
        .header("stripe-signature", sig)
        .body(axum::body::Body::from(body))
        .unwrap()
}

/// A `static` app (idempotency layer and webhook receiver) served by one runtime, then another:
/// a key stored on the first is replayed on the second (the handler runs once); a Stripe event
/// delivered on both is queued once.
#[test]
fn a_static_idempotency_layer_and_webhook_receiver_serve_two_runtimes_in_turn() {
    let app = &SERVER_SIDE.app;
    let a = current();
    let first = a.block_on(async {
        let r = send(app, order("s123-k1", "book")).await;
        assert!(send(app, stripe_delivery("evt_s123_1"))
            .await
            .0
            .is_success());
        r
    });
    assert_eq!(first.0, StatusCode::CREATED);
    end(a, 1);
    let b = multi();
    b.block_on(async {
        let again = send(app, order("s123-k1", "book")).await;
        assert_eq!(
            again, first,
            "the stored response was not replayed on the second runtime"
        );
        let (s, _) = send(app, stripe_delivery("evt_s123_1")).await;
        assert!(s.is_success(), "{s}");
        let (s, _) = send(app, stripe_delivery("evt_s123_2")).await;
        assert!(s.is_success(), "{s}");
    });
    drop(b);
    assert_eq!(SERVER_SIDE.handled.load(Ordering::SeqCst), 1);
    let mut ev = SERVER_SIDE.events.lock().unwrap();
    let ids: Vec<String> = std::iter::from_fn(|| ev.try_recv()).map(|e| e.id).collect();
    assert_eq!(ids, ["evt_s123_1", "evt_s123_2"]);
}

/// A handler running on A when A goes away (its task dies with it): the key is held for its
/// lease (150 ms) at most, then a retry on B runs the handler again, and the layer is idle.
#[test]
fn a_handler_lost_with_its_runtime_frees_its_key_after_the_lease() {
    let s = server_side();
    let a = current();
    a.block_on(async {
        let r = timeout(
            Duration::from_millis(100),
            s.app.clone().oneshot(order("s123-k2", "hang")),
        )
        .await;
        assert!(r.is_err(), "the hanging handler answered");
        assert_eq!(s.layer.running(), 1);
    });
    drop(a);
    let b = current();
    b.block_on(async {
        let t = Instant::now();
        loop {
            let (st, body) = send(&s.app, order("s123-k2", "hang")).await;
            if st == StatusCode::CREATED {
                assert_eq!(body, "order 2");
                break;
            }
            assert_eq!(st, StatusCode::CONFLICT, "{body}");
            assert!(
                t.elapsed() < Duration::from_millis(600),
                "the key stayed held: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        timeout(Duration::from_secs(1), s.layer.wait_idle())
            .await
            .expect("the layer never went idle");
        assert_eq!(s.layer.running(), 0);
    });
}

// ---------------------------------------------------------------------------------------------
// Redis: connections made on a runtime that is gone.

use sturdy::ratelimit::OnStoreError;
use sturdy::redis::{RedisIdempotencyStore, RedisQuota, RedisStreamQueue};

fn redis_url() -> String {
    std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".into())
}

fn cluster_urls() -> Vec<String> {
    std::env::var("STURDY_REDIS_CLUSTER_URLS")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn unique(tag: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("s123-{tag}-{t}")
}

/// A `RedisQuota` connected on A (each way A goes away), used by a limiter on B with
/// `OnStoreError::Fail`: every call on B goes at once, the quota still counted in Redis.
fn remote_quota_across_runtimes(cluster: bool) {
    for how in 0..3 {
        let a = current();
        let quota = Quota::per_second(1000).unwrap();
        let remote = a.block_on(async {
            let q = if cluster {
                RedisQuota::connect_cluster(cluster_urls(), quota).await
            } else {
                RedisQuota::connect(&redis_url(), quota).await
            };
            q.expect("connect").with_prefix(unique("quota"))
        });
        let remote = Arc::new(remote);
        let svc = tower::ServiceBuilder::new()
            .layer(
                RateLimitLayer::new(quota)
                    .with_remote(remote.clone())
                    .with_on_store_error(OnStoreError::Fail),
            )
            .service(gated(Gate::new(), Arc::new(AtomicUsize::new(0))));
        a.block_on(async {
            assert_eq!(status_of(svc.clone(), at("/x")).await, Ok(StatusCode::OK));
        });
        end(a, how);
        let b = multi();
        b.block_on(async {
            for i in 0..3 {
                let t = Instant::now();
                assert_eq!(
                    status_of(svc.clone(), at("/x")).await,
                    Ok(StatusCode::OK),
                    "way {how}, call {i} on B"
                );
                assert!(
                    t.elapsed() < Duration::from_millis(500),
                    "way {how}: {:?}",
                    t.elapsed()
                );
            }
            let p = timeout(Duration::from_secs(2), remote.try_paused("svc.s123.test"))
                .await
                .expect("hung");
            assert!(matches!(p, Ok(None)), "way {how}: {p:?}");
        });
    }
}

#[test]
fn a_redis_quota_connected_on_a_dead_runtime_works_on_the_next() {
    remote_quota_across_runtimes(false);
}

/// The same on the six-node cluster: every call on B is refused ("Redis cannot be reached (the
/// Redis Cluster node that serves this key is down ...) ... ClusterConnectionNotFound"), and
/// `try_reserve` still fails 8 s and 80 tries later: the connection never recovers.
#[test]
fn a_redis_cluster_quota_connected_on_a_dead_runtime_works_on_the_next() {
    remote_quota_across_runtimes(true);
}

/// Many calls at once on B, each through the same cluster quota connected on a runtime that is
/// gone: one of them makes the new connection, the others wait for it (none fails for having
/// found the old one gone while another was making the new one). Review s124.
#[test]
fn many_calls_at_once_on_a_cluster_quota_whose_runtime_is_gone_all_go() {
    for how in 0..3 {
        let a = current();
        let quota = Quota::per_second(100_000).unwrap();
        let remote = a.block_on(async {
            RedisQuota::connect_cluster(cluster_urls(), quota)
                .await
                .expect("connect")
                .with_prefix(unique("quota-many"))
        });
        let remote = Arc::new(remote);
        let svc = tower::ServiceBuilder::new()
            .layer(
                RateLimitLayer::new(quota)
                    .with_remote(remote.clone())
                    .with_on_store_error(OnStoreError::Fail),
            )
            .service(gated(Gate::new(), Arc::new(AtomicUsize::new(0))));
        a.block_on(async {
            assert_eq!(status_of(svc.clone(), at("/x")).await, Ok(StatusCode::OK));
        });
        end(a, how);
        let b = multi();
        b.block_on(async {
            let calls: Vec<_> = (0..16)
                .map(|i| tokio::spawn(status_of(svc.clone(), at(&format!("/x{i}")))))
                .collect();
            for (i, c) in calls.into_iter().enumerate() {
                assert_eq!(c.await.unwrap(), Ok(StatusCode::OK), "way {how}, call {i}");
            }
        });
    }
}

/// The Redis idempotency store connected on A, the layer serving on A then on B: the key stored
/// on A is replayed on B, no 503.
fn redis_store_across_runtimes(cluster: bool) {
    for how in 0..3 {
        let a = current();
        let store = a.block_on(async {
            let s = if cluster {
                RedisIdempotencyStore::connect_cluster(cluster_urls()).await
            } else {
                RedisIdempotencyStore::connect(&redis_url()).await
            };
            s.expect("connect").with_prefix(unique("idem"))
        });
        let handled = Arc::new(AtomicUsize::new(0));
        let h = handled.clone();
        let app = Router::new()
            .route(
                "/orders",
                post(move || {
                    let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                    async move { (StatusCode::CREATED, format!("order {n}")) }
                }),
            )
            .route_layer(IdempotencyLayer::new(store, ByCredentials::default()));
        let first = a.block_on(send(&app, order("s123-rk", "book")));
        assert_eq!(first.0, StatusCode::CREATED);
        end(a, how);
        let b = multi();
        let again = b.block_on(send(&app, order("s123-rk", "book")));
        assert_eq!(again, first, "way {how}");
        assert_eq!(handled.load(Ordering::SeqCst), 1, "way {how}");
    }
}

#[test]
fn a_redis_idempotency_store_connected_on_a_dead_runtime_serves_the_next() {
    redis_store_across_runtimes(false);
}

/// The same with a store on the cluster: 503 `idempotency-store-unavailable` ("the request was
/// not processed; retry it with the same key") on B, for a store that is up.
#[test]
fn a_redis_cluster_idempotency_store_connected_on_a_dead_runtime_serves_the_next() {
    redis_store_across_runtimes(true);
}

/// A webhook receiver on a Redis stream queue connected on A: a delivery on B after A is gone
/// is queued (2xx), not 503.
fn redis_queue_across_runtimes(cluster: bool) {
    for how in 0..3 {
        let a = current();
        let stream = unique("hooks");
        let queue = a.block_on(async {
            let q = if cluster {
                RedisStreamQueue::connect_cluster(cluster_urls(), stream.clone()).await
            } else {
                RedisStreamQueue::connect(&redis_url(), stream.clone()).await
            };
            q.expect("connect")
        });
        let app = Router::new().route(
            "/hooks",
            axum::routing::post_service(WebhookReceiver::new(
                Stripe::new("whsec_s123").unwrap(),
                queue,
            )),
        );
        let (s, body) = a.block_on(send(&app, stripe_delivery(&format!("evt_{stream}_a"))));
        assert!(s.is_success(), "{s} {body}");
        end(a, how);
        let b = current();
        let (s, body) = b.block_on(send(&app, stripe_delivery(&format!("evt_{stream}_b"))));
        assert!(s.is_success(), "way {how}: {s} {body}");
    }
}

#[test]
fn a_redis_webhook_queue_connected_on_a_dead_runtime_takes_events_on_the_next() {
    redis_queue_across_runtimes(false);
}

/// The same with the queue on the cluster: 503 "unavailable, retry later" to the sender on B.
#[test]
fn a_redis_cluster_webhook_queue_connected_on_a_dead_runtime_takes_events_on_the_next() {
    redis_queue_across_runtimes(true);
}

// ---------------------------------------------------------------------------------------------
// Combinations and kept services across runtimes.

/// Rate limit (1 per 300 ms) over adaptive concurrency pinned to 1: one call in flight holding
/// the permit and two waiting for a rate slot, all on A, when A goes away (each way). On B the
/// line and the limit are empty and a call goes within the interval.
#[test]
fn rate_limit_over_concurrency_waiters_and_holder_on_a_dead_runtime_hold_nothing() {
    for how in 0..3 {
        let (rl, rh) =
            RateLimitLayer::new(Quota::new(1, Duration::from_millis(300)).unwrap()).pair();
        let (ac, ah) = AdaptiveConcurrencyLayer::new()
            .with_limits(1, 1)
            .with_initial_limit(1)
            .pair();
        let hits = Arc::new(AtomicUsize::new(0));
        let svc = tower::ServiceBuilder::new()
            .layer(rl)
            .map_err(Into::<BoxError>::into)
            .layer(ac)
            .map_err(Into::<BoxError>::into)
            .service(gated(Gate::new(), hits.clone()));
        let a = current();
        let t0 = Instant::now();
        a.block_on(async {
            tokio::spawn(status_of(svc.clone(), at("/wait")));
            while hits.load(Ordering::SeqCst) < 1 {
                tokio::task::yield_now().await;
            }
            for _ in 0..2 {
                tokio::spawn(status_of(svc.clone(), at("/x")));
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert_eq!(rh.waiting("svc.s123.test"), 2);
        });
        end(a, how);
        let b = current();
        b.block_on(async {
            assert_eq!(rh.waiting("svc.s123.test"), 0, "way {how}");
            let st = ah.state("svc.s123.test").unwrap();
            assert_eq!((st.in_flight(), st.waiting()), (0, 0), "way {how}");
            assert_eq!(
                status_of(svc.clone(), at("/x")).await,
                Ok(StatusCode::OK),
                "way {how}"
            );
        });
        assert!(
            t0.elapsed() < Duration::from_millis(550),
            "way {how}: {:?}",
            t0.elapsed()
        );
    }
}

/// The composed client with a deadline that fits the breaker's open period: a call on A waits
/// (in the retry layer) for the probe when A goes away; on B, after the open period, a call is
/// admitted as the probe and succeeds.
#[test]
fn a_call_waiting_for_an_open_breaker_on_a_dead_runtime_leaves_the_probe_free() {
    for how in 0..3 {
        let (cb, ch) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .with_open_duration(Duration::from_millis(150), Duration::from_secs(1))
            .pair();
        let hits = Arc::new(AtomicUsize::new(0));
        let client = ClientBuilder::new()
            .with_retry(
                RetryLayer::new()
                    .with_max_attempts(1)
                    .with_deadline(Duration::from_secs(2))
                    .with_seed(3),
            )
            .with_circuit_breaker(cb)
            .build(gated(Gate::new(), hits.clone()));
        let a = current();
        a.block_on(async {
            let r = status_of(client.clone(), at("/fail")).await;
            assert_eq!(r, Ok(StatusCode::SERVICE_UNAVAILABLE));
            assert!(matches!(
                ch.state("svc.s123.test"),
                Some(CircuitState::Open { .. })
            ));
            tokio::spawn(status_of(client.clone(), at("/x")));
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        end(a, how);
        let b = multi();
        b.block_on(async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let t = Instant::now();
            assert_eq!(
                status_of(client.clone(), at("/x")).await,
                Ok(StatusCode::OK),
                "way {how}"
            );
            assert!(
                t.elapsed() < Duration::from_millis(400),
                "way {how}: {:?}",
                t.elapsed()
            );
            assert_eq!(
                ch.state("svc.s123.test"),
                Some(CircuitState::Closed),
                "way {how}"
            );
        });
    }
}

/// A kept client made ready on A (`ready().await`), A dropped, then `call` on B: the call goes
/// (every layer hands the request to the service `poll_ready` made ready).
#[test]
fn a_client_made_ready_on_a_dead_runtime_is_called_on_the_next() {
    let (addr, _) = server();
    for how in 0..3 {
        let mut client = full_client(addr);
        let a = current();
        a.block_on(async {
            assert_eq!(
                status_of(client.clone(), get(addr, "/ok")).await,
                Ok(StatusCode::OK)
            );
            timeout(Duration::from_secs(1), client.ready())
                .await
                .expect("hung")
                .unwrap();
        });
        end(a, how);
        let b = current();
        b.block_on(async {
            let res = timeout(Duration::from_secs(3), client.call(post_order(addr)))
                .await
                .expect("hung")
                .unwrap_or_else(|e| panic!("way {how}: {e}"));
            assert_eq!(res.status(), StatusCode::CREATED, "way {how}");
        });
    }
}

/// A webhook receiver served by A, then (A gone) a delivery over 64 KiB on B, verified off the
/// worker threads there: 2xx and queued.
#[test]
fn a_large_webhook_body_after_the_first_runtime_is_gone_is_verified_on_the_next() {
    let s = server_side();
    let a = current();
    let (st, _) = a.block_on(send(&s.app, stripe_delivery("evt_s123_small")));
    assert!(st.is_success());
    end(a, 2);
    let b = multi();
    let body = format!(
        r#"{{"id":"evt_s123_big","type":"x","pad":"{}"}}"#,
        "p".repeat(100 * 1024)
    );
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let sig = sturdy::webhook::sign_stripe("whsec_s123", t, body.as_bytes());
    let req = Request::post("/hooks")
        .header("stripe-signature", sig)
        .body(axum::body::Body::from(body))
        .unwrap();
    let (st, text) = b.block_on(send(&s.app, req));
    assert!(st.is_success(), "{st} {text}");
    let mut ev = s.events.lock().unwrap();
    let ids: Vec<String> = std::iter::from_fn(|| ev.try_recv()).map(|e| e.id).collect();
    assert_eq!(ids, ["evt_s123_small", "evt_s123_big"]);
}

/// A deprecation reported on A is not reported again on B for the same endpoint (the layer's
/// memory carries over), and a new endpoint on B is reported.
#[test]
fn a_deprecation_is_reported_once_across_runtimes() {
    let notices = Arc::new(AtomicUsize::new(0));
    let n = notices.clone();
    let layer = VersionLayer::header("api-version", "1")
        .unwrap()
        .on_notice(move |_| {
            n.fetch_add(1, Ordering::SeqCst);
        });
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(|_req: Req| async {
            Ok::<_, BoxError>(
                Response::builder()
                    .header("deprecation", "@1700000000")
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }));
    for i in 0..3 {
        let rt = if i % 2 == 0 { current() } else { multi() };
        rt.block_on(async {
            svc.clone().oneshot(at("/old")).await.unwrap();
        });
        end(rt, i);
    }
    assert_eq!(notices.load(Ordering::SeqCst), 1);
    current().block_on(async {
        svc.clone().oneshot(at("/older")).await.unwrap();
    });
    assert_eq!(notices.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------------
// Waiters on two runtimes in one line: the one on the dead runtime leaves it.

/// Quota 1 per 400 ms: a call takes the slot on A, a waiter on A is first in line, a waiter on B
/// (another thread) second; A goes away. B's waiter takes the first slot (about 400 ms after the
/// first call), not the second (800 ms).
#[test]
fn a_waiter_on_b_moves_up_when_the_waiter_ahead_dies_with_its_runtime() {
    for how in 0..3 {
        let (layer, handle) =
            RateLimitLayer::new(Quota::new(1, Duration::from_millis(400)).unwrap()).pair();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(gated(Gate::new(), Arc::new(AtomicUsize::new(0))));
        let a = current();
        let t0 = Instant::now();
        a.block_on(async {
            assert_eq!(status_of(svc.clone(), at("/x")).await, Ok(StatusCode::OK));
            tokio::spawn(status_of(svc.clone(), at("/x")));
            tokio::time::sleep(Duration::from_millis(10)).await;
        });
        let s2 = svc.clone();
        let waiter = on_other_thread(move || {
            let rt = current();
            let r = rt.block_on(status_of(s2, at("/x")));
            (r, t0.elapsed())
        });
        while handle.waiting("svc.s123.test") < 2 && t0.elapsed() < Duration::from_millis(200) {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(handle.waiting("svc.s123.test"), 2, "way {how}");
        end(a, how);
        let (r, took) = waiter.recv_timeout(Duration::from_secs(3)).expect("hung");
        assert_eq!(r, Ok(StatusCode::OK), "way {how}");
        assert!(
            took < Duration::from_millis(650),
            "way {how}: B's waiter went at {took:?}, behind the dead waiter's slot"
        );
    }
}

/// Adaptive concurrency pinned to 1: the permit held by a call on A, a waiter for it on B; A goes
/// away: B's waiter gets the permit at once.
#[test]
fn a_concurrency_waiter_on_b_gets_the_permit_of_a_call_dead_with_its_runtime() {
    for how in 0..3 {
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_limits(1, 1)
            .with_initial_limit(1)
            .with_max_wait(Duration::from_secs(3))
            .pair();
        let hits = Arc::new(AtomicUsize::new(0));
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .map_err(Into::<BoxError>::into)
            .service(gated(Gate::new(), hits.clone()));
        let a = current();
        a.block_on(async {
            tokio::spawn(status_of(svc.clone(), at("/wait")));
            while hits.load(Ordering::SeqCst) < 1 {
                tokio::task::yield_now().await;
            }
        });
        let s2 = svc.clone();
        let waiter = on_other_thread(move || {
            let rt = multi();
            rt.block_on(status_of(s2, at("/x")))
        });
        let t = Instant::now();
        while handle.state("svc.s123.test").unwrap().waiting() < 1
            && t.elapsed() < Duration::from_secs(1)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            handle.state("svc.s123.test").unwrap().waiting(),
            1,
            "way {how}"
        );
        let t = Instant::now();
        end(a, how);
        let r = waiter.recv_timeout(Duration::from_secs(4)).expect("hung");
        assert_eq!(r, Ok(StatusCode::OK), "way {how}");
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "way {how}: {:?}",
            t.elapsed()
        );
    }
}

/// Through the client (deadline 2 s): a half-open probe in flight on A, and a call on B refused
/// as `Probing` waiting in the retry layer to look again; A goes away. B's call becomes the
/// probe at its next look (about the 250 ms backoff base plus jitter) and succeeds.
#[test]
fn a_call_on_b_waiting_for_a_probe_that_died_with_a_becomes_the_probe() {
    for how in 0..3 {
        let (cb, ch) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .with_open_duration(Duration::from_millis(50), Duration::from_secs(1))
            .pair();
        let hits = Arc::new(AtomicUsize::new(0));
        let client = ClientBuilder::new()
            .with_retry(
                RetryLayer::new()
                    .with_deadline(Duration::from_secs(2))
                    .with_seed(5),
            )
            .with_circuit_breaker(cb)
            .build(gated(Gate::new(), hits.clone()));
        let a = current();
        a.block_on(async {
            let mut opts = sturdy::core::CallOptions::new().without_retries();
            opts = opts.with_attempt_timeout(Duration::from_secs(1));
            let mut req = at("/fail");
            req.extensions_mut().insert(opts);
            let _ = status_of(client.clone(), req).await;
            assert!(matches!(
                ch.state("svc.s123.test"),
                Some(CircuitState::Open { .. })
            ));
            tokio::time::sleep(Duration::from_millis(70)).await;
            tokio::spawn(status_of(client.clone(), at("/wait")));
            while hits.load(Ordering::SeqCst) < 2 {
                tokio::task::yield_now().await;
            }
        });
        let c = client.clone();
        let waiter = on_other_thread(move || {
            let rt = current();
            let t = Instant::now();
            (rt.block_on(status_of(c, at("/x"))), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(30));
        end(a, how);
        let (r, took) = waiter.recv_timeout(Duration::from_secs(4)).expect("hung");
        assert_eq!(r, Ok(StatusCode::OK), "way {how}");
        assert!(took < Duration::from_millis(900), "way {how}: {took:?}");
        assert_eq!(
            ch.state("svc.s123.test"),
            Some(CircuitState::Closed),
            "way {how}"
        );
    }
}

/// The retry layer alone with a per-host budget: calls in their backoff sleep on A (after a 503)
/// when A goes away; on B the host is not refused (no budget spent by the dead calls beyond
/// their first retry): a call goes at once and one that meets a 503 is retried once more.
#[test]
fn calls_in_a_retry_backoff_on_a_dead_runtime_leave_the_next_runtime_its_retries() {
    for how in 0..3 {
        let hits = Arc::new(AtomicUsize::new(0));
        let retry = RetryLayer::new()
            .with_backoff(
                sturdy::retry::Backoff::exponential(
                    Duration::from_millis(300),
                    Duration::from_millis(300),
                )
                .unwrap(),
            )
            .with_max_attempts(2)
            .with_seed(9);
        let svc = tower::ServiceBuilder::new()
            .layer(retry)
            .service(gated(Gate::new(), hits.clone()));
        let a = current();
        a.block_on(async {
            for _ in 0..3 {
                tokio::spawn(status_of(svc.clone(), at("/fail")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(hits.load(Ordering::SeqCst), 3);
        });
        end(a, how);
        let b = multi();
        b.block_on(async {
            assert_eq!(
                status_of(svc.clone(), at("/x")).await,
                Ok(StatusCode::OK),
                "way {how}"
            );
            let before = hits.load(Ordering::SeqCst);
            let t = Instant::now();
            assert_eq!(
                status_of(svc.clone(), at("/fail")).await,
                Ok(StatusCode::SERVICE_UNAVAILABLE),
                "way {how}"
            );
            assert_eq!(
                hits.load(Ordering::SeqCst) - before,
                2,
                "way {how}: not retried on B"
            );
            assert!(
                t.elapsed() < Duration::from_millis(800),
                "way {how}: {:?}",
                t.elapsed()
            );
        });
    }
}

/// A Redis Cluster `RedisConnection` made on a runtime that is gone, used on the next one with
/// pipelines only: the first pipeline fails (the redis client cannot tell it from one whose
/// answer was lost), the next pipeline goes on a connection made anew. Review s124.
#[test]
fn a_cluster_connection_used_only_for_pipelines_recovers_on_the_next_runtime() {
    for how in 0..3 {
        let a = current();
        let conn = a.block_on(async {
            sturdy::redis::RedisConnection::connect_cluster(cluster_urls())
                .await
                .expect("connect")
        });
        let key = unique("{s123-pipe}");
        let pipe = |conn: sturdy::redis::RedisConnection, key: String| async move {
            let mut conn = conn;
            let mut p = redis::pipe();
            p.cmd("SET").arg(&key).arg("v").ignore();
            p.cmd("GET").arg(&key);
            timeout(
                Duration::from_secs(3),
                p.query_async::<(String,)>(&mut conn),
            )
            .await
            .expect("hung")
        };
        assert_eq!(
            a.block_on(pipe(conn.clone(), key.clone())).unwrap(),
            ("v".to_owned(),)
        );
        end(a, how);
        let b = multi();
        b.block_on(async {
            let _first = pipe(conn.clone(), key.clone()).await;
            let second = pipe(conn.clone(), key.clone()).await;
            assert_eq!(
                second.map_err(|e| e.to_string()),
                Ok(("v".to_owned(),)),
                "way {how}"
            );
        });
    }
}
