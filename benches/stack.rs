//! The whole client stack on the happy path, over the bare service it wraps.
//!
//! cargo bench -p sturdy-benches --bench stack -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_main, Criterion};
use http::{Request, Response, Uri};
use http_body_util::Full;
use sturdy::ClientBuilder;
use tower::{service_fn, Service, ServiceExt};

fn bare() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<()>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response<()>, std::convert::Infallible>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|_r: Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(Response::new(())))
    })
}

fn request(uri: &Uri, method: &http::Method) -> Request<Full<Bytes>> {
    let mut r = Request::new(Full::new(Bytes::from_static(b"{\"item\":\"book\"}")));
    *r.uri_mut() = uri.clone();
    *r.method_mut() = method.clone();
    r
}

fn stack(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let uri = Uri::from_static("http://api.example.com/orders");
    let mut g = c.benchmark_group("stack/happy path");
    for method in [http::Method::GET, http::Method::POST] {
        g.bench_function(format!("bare service, {method}"), |b| {
            let svc = bare();
            b.iter(|| {
                rt.block_on(async {
                    black_box(svc.clone().oneshot(request(&uri, &method)).await.unwrap())
                })
            });
        });
        g.bench_function(format!("ClientBuilder default stack, {method}"), |b| {
            let svc = ClientBuilder::new().build(bare());
            b.iter(|| {
                rt.block_on(async {
                    black_box(svc.clone().oneshot(request(&uri, &method)).await.unwrap())
                })
            });
        });
        g.bench_function(
            format!("ClientBuilder without the per-attempt timer, {method}"),
            |b| {
                let svc = ClientBuilder::new().without_attempt_timeout().build(bare());
                b.iter(|| {
                    rt.block_on(async {
                        black_box(svc.clone().oneshot(request(&uri, &method)).await.unwrap())
                    })
                });
            },
        );
    }
    g.finish();

    // Each layer alone over the bare service, to see where the stack's cost goes.
    let mut g = c.benchmark_group("stack/one layer, POST");
    let none = || {
        ClientBuilder::new()
            .without_idempotency()
            .without_retry()
            .without_circuit_breaker()
            .without_rate_limit()
            .without_attempt_timeout()
    };
    let post = http::Method::POST;
    let variants: Vec<(&str, sturdy::Client<()>)> = vec![
        ("boxed, no layers", none().build(bare())),
        (
            "idempotency",
            none()
                .with_idempotency(sturdy::idempotency::client::IdempotencyKeyLayer::new())
                .build(bare()),
        ),
        (
            "retry",
            none()
                .with_retry(sturdy::retry::RetryLayer::new())
                .build(bare()),
        ),
        (
            "circuit breaker",
            none()
                .with_circuit_breaker(sturdy::circuit::CircuitBreakerLayer::new())
                .build(bare()),
        ),
        (
            "rate limit (adaptive)",
            none()
                .with_rate_limit(sturdy::ratelimit::RateLimitLayer::adaptive_only())
                .build(bare()),
        ),
        (
            "attempt timeout",
            none()
                .with_attempt_timeout(std::time::Duration::from_secs(30))
                .build(bare()),
        ),
    ];
    for (name, svc) in variants {
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    black_box(svc.clone().oneshot(request(&uri, &post)).await.unwrap())
                })
            });
        });
    }
    g.finish();

    // The default stack next to a stack of tower's own layers doing comparable work: a retry
    // layer whose policy never retries but copies the request for a replay, a timeout, a rate
    // limit, a concurrency limit, and a header set on each request. tower's `RateLimit` cannot be
    // cloned, so both stacks are kept and driven with `ready().call()`, both boxed once.
    let mut g = c.benchmark_group("stack/vs tower reference");
    for method in [http::Method::GET, http::Method::POST] {
        g.bench_function(format!("sturdy default stack, {method}"), |b| {
            let mut svc = ClientBuilder::new().build(bare());
            b.iter(|| {
                rt.block_on(async {
                    let ready = svc.ready().await.unwrap();
                    black_box(ready.call(request(&uri, &method)).await.unwrap())
                })
            });
        });
        g.bench_function(format!("tower reference stack, {method}"), |b| {
            // tower's rate limit makes its timer when it is made: inside the runtime.
            let mut svc = {
                let _rt = rt.enter();
                reference()
            };
            b.iter(|| {
                rt.block_on(async {
                    let ready = svc.ready().await.unwrap();
                    black_box(ready.call(request(&uri, &method)).await.unwrap())
                })
            });
        });
    }
    g.finish();
}

/// A retry policy that never retries but, like a real one, copies each request for a replay.
#[derive(Clone)]
struct NeverRetry;

impl tower::retry::Policy<Request<Full<Bytes>>, Response<()>, sturdy::core::BoxError>
    for NeverRetry
{
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<Full<Bytes>>,
        _result: &mut Result<Response<()>, sturdy::core::BoxError>,
    ) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, req: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        let mut r = Request::new(req.body().clone());
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.version_mut() = req.version();
        *r.headers_mut() = req.headers().clone();
        *r.extensions_mut() = req.extensions().clone();
        Some(r)
    }
}

/// tower's own layers doing about what the default stack does, boxed once like `ClientBuilder`.
fn reference() -> tower::util::BoxService<Request<Full<Bytes>>, Response<()>, sturdy::core::BoxError>
{
    let svc = tower::ServiceBuilder::new()
        .layer(
            tower_http::set_header::SetRequestHeaderLayer::if_not_present(
                http::HeaderName::from_static("idempotency-key"),
                http::HeaderValue::from_static("7f0c2b6e-5d1a-4c7e-9b1e-2f4a6d8c0e13"),
            ),
        )
        // tower's rate limit cannot be cloned, and its retry clones what is under it: the rate
        // limit goes above the retry.
        .layer(tower::limit::RateLimitLayer::new(
            1_000_000_000,
            std::time::Duration::from_secs(1),
        ))
        .layer(tower::limit::ConcurrencyLimitLayer::new(1_000))
        .layer(tower::retry::RetryLayer::new(NeverRetry))
        .layer(tower::timeout::TimeoutLayer::new(
            std::time::Duration::from_secs(30),
        ))
        .service(bare());
    tower::util::BoxService::new(svc)
}

/// The same stack against a real hyper server on loopback (the chaos server, no faults): the
/// throughput cost the stack adds end to end. The calls run in a task on the runtime's worker, as
/// an application's calls do.
fn loopback(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt
        .block_on(sturdy_chaos::ChaosServer::start(sturdy_chaos::Knobs {
            orders: 5,
            ..Default::default()
        }))
        .unwrap();
    let uri: Uri = server.url("/orders/o_1").parse().unwrap();
    let mut g = c.benchmark_group("stack/loopback GET");
    let run =
        |name: &str,
         client: sturdy::Client<hyper::body::Incoming>,
         g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>| {
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let (client, uri) = (client.clone(), uri.clone());
                    rt.block_on(rt.spawn(async move {
                        let start = tokio::time::Instant::now();
                        for _ in 0..iters {
                            black_box(
                                client
                                    .clone()
                                    .oneshot(request(&uri, &http::Method::GET))
                                    .await
                                    .unwrap(),
                            );
                        }
                        start.elapsed()
                    }))
                    .unwrap()
                });
            });
        };
    run(
        "bare hyper-util client",
        ClientBuilder::new()
            .without_idempotency()
            .without_retry()
            .without_circuit_breaker()
            .without_rate_limit()
            .without_attempt_timeout()
            .build(sturdy_chaos::http_client()),
        &mut g,
    );
    run(
        "ClientBuilder without the per-attempt timer",
        ClientBuilder::new()
            .without_attempt_timeout()
            .build(sturdy_chaos::http_client()),
        &mut g,
    );
    run(
        "ClientBuilder default stack",
        ClientBuilder::new().build(sturdy_chaos::http_client()),
        &mut g,
    );
    g.finish();
}

// criterion_group! makes an undocumented pub fn.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion::criterion_group!(benches, stack, loopback);
}
use group::benches;
criterion_main!(benches);
