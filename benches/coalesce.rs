//! The coalescing layer's cost on the happy path: a request that is never coalesced (POST), and
//! a GET that finds no identical call in flight and so starts a shared one.
//!
//! cargo bench -p sturdy-benches --bench coalesce -- --warm-up-time 1 --measurement-time 3

use std::convert::Infallible;
use std::hint::black_box;

// Only `now` is used here; the other helpers take `Request<()>`.
#[path = "support/mod.rs"]
#[allow(dead_code)]
mod support;
use support::now;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Method, Request, Response, Uri};
use http_body_util::Empty;
use sturdy::coalesce::CoalesceLayer;
use tower::{service_fn, Layer, Service};

type Body = Empty<Bytes>;

/// A service that answers at once with an empty body.
fn bare() -> impl Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
> + Clone {
    service_fn(|_r: Request<Body>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Body::new())))
    })
}

/// One call: drive to readiness, call, run the future to completion.
fn call<S: Service<Request<Body>>>(svc: &mut S, uri: &Uri, method: &Method) {
    let _ = now(std::future::poll_fn(|cx| svc.poll_ready(cx)));
    let mut r = Request::new(Body::new());
    *r.uri_mut() = uri.clone();
    *r.method_mut() = method.clone();
    let _ = black_box(now(svc.call(r)));
}

fn single(c: &mut Criterion) {
    let uri = Uri::from_static("http://api.example.com/orders");
    let mut g = c.benchmark_group("coalesce/happy path/1 thread");
    for method in [Method::POST, Method::GET] {
        g.bench_function(format!("bare service (baseline), {method}"), |b| {
            let mut svc = bare();
            b.iter(|| call(&mut svc, &uri, &method));
        });
        let what = if method == Method::GET {
            "starts a shared call"
        } else {
            "never coalesced"
        };
        g.bench_function(format!("Coalesce, {method} ({what})"), |b| {
            let mut svc = CoalesceLayer::new().layer(bare());
            b.iter(|| call(&mut svc, &uri, &method));
        });
    }
    g.finish();
}

// criterion_group! makes an undocumented pub fn.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, single);
}
use group::benches;
criterion_main!(benches);
