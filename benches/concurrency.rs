//! The adaptive concurrency limit's cost on the happy path: a place is free.
//!
//! cargo bench -p sturdy-benches --bench concurrency -- --warm-up-time 1 --measurement-time 3

#[path = "support/mod.rs"]
mod support;
use support::{bare, call, two_threads};

use criterion::{criterion_group, criterion_main, Criterion};
use http::Uri;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, Algorithm};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::Layer;

fn single(c: &mut Criterion) {
    let uri = Uri::from_static("http://api.example.com/orders");
    let mut g = c.benchmark_group("concurrency/place free/1 thread");
    g.bench_function("bare service (baseline)", |b| {
        let mut svc = bare();
        b.iter(|| call(&mut svc, &uri));
    });
    g.bench_function("sturdy AdaptiveConcurrency, AIMD", |b| {
        let mut svc = AdaptiveConcurrencyLayer::new().layer(bare());
        b.iter(|| call(&mut svc, &uri));
    });
    g.bench_function("sturdy AdaptiveConcurrency, Vegas", |b| {
        let mut svc = AdaptiveConcurrencyLayer::new()
            .with_algorithm(Algorithm::Vegas)
            .layer(bare());
        b.iter(|| call(&mut svc, &uri));
    });
    g.bench_function("tower GlobalConcurrencyLimit (fixed)", |b| {
        let mut svc = GlobalConcurrencyLimitLayer::new(20).layer(bare());
        b.iter(|| call(&mut svc, &uri));
    });
    g.finish();
}

fn contended(c: &mut Criterion) {
    let uri = Uri::from_static("http://api.example.com/orders");
    let mut g = c.benchmark_group("concurrency/place free/2 threads");
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
    g.bench_function("sturdy AdaptiveConcurrency, AIMD", |b| {
        let svc = AdaptiveConcurrencyLayer::new().layer(bare());
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut s = svc.clone();
                let uri = uri.clone();
                move || call(&mut s, &uri)
            })
        });
    });
    g.bench_function("tower GlobalConcurrencyLimit (fixed)", |b| {
        let svc = GlobalConcurrencyLimitLayer::new(20).layer(bare());
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut s = svc.clone();
                let uri = uri.clone();
                move || call(&mut s, &uri)
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
