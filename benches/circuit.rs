//! Breaker admission on the happy path (closed state), side by side with failsafe's `call`, single
//! threaded and with 2 threads contending on one breaker.
//!
//! cargo bench -p sturdy-benches --bench circuit -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;

#[path = "support/mod.rs"]
mod support;
use support::{bare, call, two_threads};

use criterion::{criterion_group, criterion_main, Criterion};
use failsafe::CircuitBreaker as _;
use http::Uri;
use sturdy::circuit::CircuitBreakerLayer;
use tower::Layer;

fn single(c: &mut Criterion) {
    // A static URI: cloning it touches no shared reference count, so threads do not contend on it.
    let uri = Uri::from_static("http://api.example.com/orders");
    let mut g = c.benchmark_group("circuit/closed/1 thread");
    g.bench_function("bare service (baseline)", |b| {
        let mut svc = bare();
        b.iter(|| call(&mut svc, &uri));
    });
    g.bench_function("sturdy CircuitBreaker service", |b| {
        let mut svc = CircuitBreakerLayer::new().layer(bare());
        b.iter(|| call(&mut svc, &uri));
    });
    g.bench_function("failsafe call", |b| {
        let cb = failsafe::Config::new().build();
        b.iter(|| black_box(cb.call(|| Ok::<_, ()>(black_box(1u8)))));
    });
    g.finish();
}

fn contended(c: &mut Criterion) {
    // A static URI: cloning it touches no shared reference count, so threads do not contend on it.
    let uri = Uri::from_static("http://api.example.com/orders");
    let mut g = c.benchmark_group("circuit/closed/2 threads");
    g.bench_function("bare service (baseline)", |b| {
        let svc = bare();
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut s = svc.clone();
                let uri = uri.clone();
                move || call(&mut s, &uri)
            })
        });
    });
    g.bench_function("sturdy CircuitBreaker service", |b| {
        let svc = CircuitBreakerLayer::new().layer(bare());
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut s = svc.clone();
                let uri = uri.clone();
                move || call(&mut s, &uri)
            })
        });
    });
    g.bench_function("failsafe call", |b| {
        let cb = failsafe::Config::new().build();
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let cb = cb.clone();
                move || {
                    let _ = black_box(cb.call(|| Ok::<_, ()>(black_box(1u8))));
                }
            })
        });
    });
    g.finish();
}

// criterion_group! makes an undocumented pub fn.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, single, contended);
}
use group::benches;
criterion_main!(benches);
