//! Helpers of the `edge30_*` tests: timing how a parser's cost grows with its input, and a small
//! hyper server on loopback.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::cost_common::fastest;

/// Builds an input of size `n` with `make`, times `run` on it (fastest of 5), at `n` and `16n`,
/// after a warm-up. Returns `(small, large, large / small)`.
pub(crate) fn grow<T>(
    n: usize,
    make: impl Fn(usize) -> T,
    mut run: impl FnMut(&T),
) -> (Duration, Duration, f64) {
    let small = make(n);
    let large = make(16 * n);
    run(&small);
    let a = fastest(5, || run(&small));
    let b = fastest(3, || run(&large));
    // A small run under 4 µs is too short to time against a loaded machine's noise (one run of
    // 1.6 µs against 131 µs read as x65 in CI): it counts as 4 µs. A quadratic cost still shows,
    // as 256x of at least 1 µs.
    (a, b, b.as_secs_f64() / a.as_secs_f64().max(4e-6))
}

/// Asserts the cost of `run` is linear: 16x the input costs at most 64x the time (quadratic
/// would be 256x), and the largest run takes under 5 s in a debug build.
pub(crate) fn assert_linear<T>(
    what: &str,
    n: usize,
    make: impl Fn(usize) -> T,
    run: impl FnMut(&T),
) {
    let (a, b, r) = grow(n, make, run);
    assert!(
        r < 64.0 && b < Duration::from_secs(5),
        "{what}: {n} -> {a:?}, {} -> {b:?} (x{r:.1}); 16x the input must cost ~16x",
        16 * n
    );
}

/// The body a test server answers with.
pub(crate) type SrvBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A whole body.
pub(crate) fn full(b: impl Into<Bytes>) -> SrvBody {
    use http_body_util::BodyExt;
    Full::new(b.into()).boxed()
}

/// A hyper HTTP/1.1 server on 127.0.0.1:0 that answers every request with `handler`.
pub(crate) async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<SrvBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let h = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Waits (real time, up to 20 s) until `cond` holds.
pub(crate) async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Counts the futures dropped before they finished.
pub(crate) struct DropGuard(
    pub(crate) std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) bool,
);

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// A hyper-util client over plain HTTP.
pub(crate) fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}
