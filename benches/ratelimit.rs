//! The rate-limit decision on the happy path (a permit is available), side by side with
//! governor's `check()` and tower's `RateLimit`, single threaded and with 2 threads contending on
//! one key.
//!
//! cargo bench -p sturdy-benches --bench ratelimit -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

#[path = "support/mod.rs"]
mod support;
use support::{bare, call, two_threads};

use criterion::{criterion_main, Criterion};
use http::Uri;
use sturdy::ratelimit::{DirectLimiter, Quota, RateLimitLayer};
use tower::Layer;

/// A quota the bench never exhausts: a billion per second, with a burst of a billion.
fn huge() -> Quota {
    Quota::per_second(1_000_000_000)
        .unwrap()
        .with_burst(1_000_000_000)
        .unwrap()
}

fn governor_limiter() -> governor::DefaultDirectRateLimiter {
    let n = NonZeroU32::new(1_000_000_000).unwrap();
    governor::RateLimiter::direct(governor::Quota::per_second(n).allow_burst(n))
}

fn single(c: &mut Criterion) {
    let uri = Uri::from_static("http://api.example.com/orders");
    let mut g = c.benchmark_group("ratelimit/permit available/1 thread");
    g.bench_function("bare service (baseline)", |b| {
        let mut svc = bare();
        b.iter(|| call(&mut svc, &uri));
    });
    g.bench_function("sturdy RateLimit service", |b| {
        let mut svc = RateLimitLayer::new(huge()).layer(bare());
        b.iter(|| call(&mut svc, &uri));
    });
    g.bench_function("tower RateLimit service", |b| {
        // tower's limiter needs a runtime for its timer; its state is per instance.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let mut svc = tower::limit::RateLimit::new(
            bare(),
            tower::limit::rate::Rate::new(1_000_000_000, Duration::from_secs(1)),
        );
        b.iter(|| call(&mut svc, &uri));
    });
    g.bench_function("governor check", |b| {
        let lim = governor_limiter();
        b.iter(|| black_box(lim.check()));
    });
    g.bench_function("sturdy DirectLimiter check", |b| {
        let lim = DirectLimiter::new(huge());
        b.iter(|| black_box(lim.check()));
    });
    // The clock each decision reads, alone: tokio's (the system's monotonic clock in a production
    // build; what lets sturdy's timing run on paused time in tests) and governor's (the CPU's
    // time-stamp counter, through quanta).
    g.bench_function("clock read: tokio Instant::now", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()));
    });
    g.bench_function("clock read: governor QuantaClock::now", |b| {
        use governor::clock::Clock;
        let clock = governor::clock::QuantaClock::default();
        b.iter(|| black_box(clock.now()));
    });
    g.finish();
}

fn contended(c: &mut Criterion) {
    let uri = Uri::from_static("http://api.example.com/orders");
    let mut g = c.benchmark_group("ratelimit/permit available/2 threads");
    g.bench_function("bare service (baseline)", |b| {
        let svc = bare();
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let (mut s, uri) = (svc.clone(), uri.clone());
                move || call(&mut s, &uri)
            })
        });
    });
    g.bench_function("sturdy RateLimit service", |b| {
        let svc = RateLimitLayer::new(huge()).layer(bare());
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let (mut s, uri) = (svc.clone(), uri.clone());
                move || call(&mut s, &uri)
            })
        });
    });
    g.bench_function("sturdy DirectLimiter check", |b| {
        let lim = std::sync::Arc::new(DirectLimiter::new(huge()));
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let lim = lim.clone();
                move || {
                    let _ = black_box(lim.check());
                }
            })
        });
    });
    g.bench_function("governor check", |b| {
        let lim = std::sync::Arc::new(governor_limiter());
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let lim = lim.clone();
                move || {
                    let _ = black_box(lim.check());
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
    criterion::criterion_group!(benches, single, contended);
}
use group::benches;
criterion_main!(benches);
