//! Helpers shared by the benchmarks.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{Request, Response, Uri};
use tower::{service_fn, Service};

/// Polls a future that is ready at once.
pub(crate) fn now<F: Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("the bench services are always ready"),
    }
}

/// Runs `iters` calls split over 2 threads; returns the wall time (criterion divides by `iters`).
pub(crate) fn two_threads<F, M>(iters: u64, make: M) -> Duration
where
    M: Fn() -> F,
    F: FnMut() + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(3));
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

/// A `Request<()>` to `uri`.
pub(crate) fn request(uri: &Uri) -> Request<()> {
    let mut r = Request::new(());
    *r.uri_mut() = uri.clone();
    r
}

/// A service that answers at once: the baseline every layer is measured over.
pub(crate) fn bare(
) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone + Send + 'static
{
    service_fn(|_r: Request<()>| std::future::ready(Ok::<_, Infallible>(Response::new(()))))
}

/// One call: drive to readiness, call, run the future to completion.
pub(crate) fn call<S: Service<Request<()>>>(svc: &mut S, uri: &Uri) {
    let _ = now(std::future::poll_fn(|cx| svc.poll_ready(cx)));
    let _ = black_box(now(svc.call(request(uri))));
}
