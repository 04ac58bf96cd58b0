//! The hedging layer's cost on the happy path: calls that answer before any hedge is due.
//!
//! cargo bench -p sturdy-benches --bench hedge -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;

#[path = "support/mod.rs"]
mod support;
use support::{bare, call, now, two_threads};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{Method, Request, Uri};
use sturdy::hedge::HedgeLayer;
use tower::{Layer, Service};

/// One call with `method`.
fn call_with<S: Service<Request<()>>>(svc: &mut S, uri: &Uri, method: &Method) {
    let _ = now(std::future::poll_fn(|cx| svc.poll_ready(cx)));
    let mut r = Request::new(());
    *r.uri_mut() = uri.clone();
    *r.method_mut() = method.clone();
    let _ = black_box(now(svc.call(r)));
}

fn single(c: &mut Criterion) {
    let uri = Uri::from_static("http://api.example.com/orders");
    let mut g = c.benchmark_group("hedge/happy path/1 thread");
    g.bench_function("bare service (baseline)", |b| {
        let mut svc = bare();
        b.iter(|| call(&mut svc, &uri));
    });
    g.bench_function("Hedge, POST (never hedged)", |b| {
        let mut svc = HedgeLayer::new().layer(bare());
        b.iter(|| call_with(&mut svc, &uri, &Method::POST));
    });
    g.bench_function("Hedge, GET, no delay yet (too few samples)", |b| {
        // A minimum no bench run reaches: every call is recorded, none is armed.
        let mut svc = HedgeLayer::new().with_min_samples(u64::MAX).layer(bare());
        b.iter(|| call(&mut svc, &uri));
    });
    g.bench_function("Hedge, GET, armed (answered before the delay)", |b| {
        let mut svc = HedgeLayer::new().layer(bare());
        for _ in 0..200 {
            call(&mut svc, &uri);
        }
        b.iter(|| call(&mut svc, &uri));
    });
    g.finish();
}

fn contended(c: &mut Criterion) {
    let uri = Uri::from_static("http://api.example.com/orders");
    let mut g = c.benchmark_group("hedge/happy path/2 threads");
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
    g.bench_function("Hedge, GET, armed (answered before the delay)", |b| {
        let mut svc = HedgeLayer::new().layer(bare());
        for _ in 0..200 {
            call(&mut svc, &uri);
        }
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
