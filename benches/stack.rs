//! The whole client stack on the happy path, over the bare service it wraps.
//!
//! cargo bench -p sturdy-benches --bench stack -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;

use criterion::{criterion_main, Criterion};
use http::Uri;
use sturdy::ClientBuilder;

#[path = "support/stack_parts.rs"]
mod stack_parts;
use stack_parts::{bare, pending_once, reference, reference_with_fresh_keys, request};
use tower::{Service, ServiceExt};

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

    // The same, over a service that answers at its second poll: each attempt's timer is made,
    // registered and cancelled, as on a network.
    let mut g = c.benchmark_group("stack/answered at the second poll");
    let get = http::Method::GET;
    g.bench_function("bare service, GET", |b| {
        let svc = pending_once();
        b.iter(|| {
            rt.block_on(async {
                black_box(svc.clone().oneshot(request(&uri, &get)).await.unwrap())
            })
        });
    });
    g.bench_function("ClientBuilder default stack, GET", |b| {
        let svc = ClientBuilder::new().build(pending_once());
        b.iter(|| {
            rt.block_on(async {
                black_box(svc.clone().oneshot(request(&uri, &get)).await.unwrap())
            })
        });
    });
    g.bench_function("ClientBuilder without the per-attempt timer, GET", |b| {
        let svc = ClientBuilder::new()
            .without_attempt_timeout()
            .build(pending_once());
        b.iter(|| {
            rt.block_on(async {
                black_box(svc.clone().oneshot(request(&uri, &get)).await.unwrap())
            })
        });
    });
    g.bench_function("bare service under tower's Timeout, GET", |b| {
        let svc = tower::timeout::Timeout::new(pending_once(), std::time::Duration::from_secs(30));
        b.iter(|| {
            rt.block_on(async {
                black_box(svc.clone().oneshot(request(&uri, &get)).await.unwrap())
            })
        });
    });
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
        for (name, make) in [
            ("tower reference stack", reference as fn() -> _),
            (
                "tower reference stack, fresh key per request",
                reference_with_fresh_keys,
            ),
        ] {
            g.bench_function(format!("{name}, {method}"), |b| {
                // tower's rate limit makes its timer when it is made: inside the runtime.
                let mut svc = {
                    let _rt = rt.enter();
                    make()
                };
                b.iter(|| {
                    rt.block_on(async {
                        let ready = svc.ready().await.unwrap();
                        black_box(ready.call(request(&uri, &method)).await.unwrap())
                    })
                });
            });
        }
    }
    g.finish();
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
