//! Breaker admission on the happy path (closed state), side by side with failsafe's `call`, single
//! threaded and with 2 threads contending on one breaker.
//!
//! cargo bench --bench circuit -- --warm-up-time 1 --measurement-time 3

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{criterion_group, criterion_main, Criterion};
use failsafe::CircuitBreaker as _;
use http::{Request, Response, Uri};
use sturdy::circuit::CircuitBreakerLayer;
use tower::{service_fn, Layer, Service};

/// Polls a future that is ready at once.
fn now<F: Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("the bench services are always ready"),
    }
}

fn request(uri: &Uri) -> Request<()> {
    let mut r = Request::new(());
    *r.uri_mut() = uri.clone();
    r
}

fn bare() -> impl Service<Request<()>, Response = Response<()>, Error = std::convert::Infallible>
       + Clone
       + Send
       + 'static {
    service_fn(|_r: Request<()>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(Response::new(())))
    })
}

fn call<S: Service<Request<()>>>(svc: &mut S, uri: &Uri) {
    let _ = now(std::future::poll_fn(|cx| svc.poll_ready(cx)));
    let _ = black_box(now(svc.call(request(uri))));
}

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

/// Runs `iters` calls split over 2 threads; returns the wall time per call times `iters`.
fn two_threads<F, M>(iters: u64, make: M) -> std::time::Duration
where
    M: Fn() -> F,
    F: FnMut() + Send + 'static,
{
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(3));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let mut f = make();
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                for _ in 0..iters / 2 {
                    f();
                }
            })
        })
        .collect();
    barrier.wait();
    // Benchmarks measure wall time; the clippy rule is for library code.
    #[allow(clippy::disallowed_methods)]
    let start = std::time::Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed()
}

// criterion_group! makes an undocumented pub fn.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, single, contended);
}
use group::benches;
criterion_main!(benches);
