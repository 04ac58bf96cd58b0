//! docs/guides/coalesce.md and sturdy-coalesce's crate docs, read literally: what is coalesced
//! (GET/HEAD with an empty body), which headers make two requests different (and the list
//! `with_ignored_headers` replaces), shared errors and their words, a panicking `call`, the body
//! bound, leaving callers and the dropped upstream call, "not a cache", the counters, and a
//! joining request that gives its ready service back. Paused time in process, and one
//! multi-thread test in real time.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::coalesce::{CoalesceLayer, SharedError};
use sturdy::core::{classify, find, BoxError, Delivery, ErrorKind};
use tower::{Layer, Service, ServiceExt};

#[derive(Clone, Copy)]
enum Act {
    /// After 50 ms, 200 with a body of this many bytes.
    Body(usize),
    /// After 50 ms, a reset connection.
    Reset,
    /// Never answers; sets `dropped` when its future is dropped.
    Pending,
}

#[derive(Clone)]
struct Api {
    act: Act,
    calls: Arc<AtomicUsize>,
    dropped: Arc<AtomicBool>,
}

impl Api {
    fn new(act: Act) -> Self {
        Self {
            act,
            calls: Arc::default(),
            dropped: Arc::default(),
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

struct SetOnDrop(Arc<AtomicBool>);
impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Service<Request<Full<Bytes>>> for Api {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>,
    >;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let act = self.act;
        let guard = SetOnDrop(self.dropped.clone());
        Box::pin(async move {
            let _guard = guard;
            match act {
                Act::Body(n) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(Response::builder()
                        .header("x-served", "yes")
                        .body(Full::from(vec![b'a'; n]))
                        .unwrap())
                }
                Act::Reset => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(
                        Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
                            as BoxError,
                    )
                }
                Act::Pending => std::future::pending().await,
            }
        })
    }
}

fn req(method: Method, headers: &[(&str, &str)], body: &'static str) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri("http://api.example.com/report?day=1");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::from(body)).unwrap()
}

/// Sends `reqs` at once through `layer` over a fresh API; returns how many calls it received.
async fn burst(layer: &CoalesceLayer, reqs: Vec<Request<Full<Bytes>>>) -> usize {
    let api = Api::new(Act::Body(10));
    let svc = layer.layer(api.clone());
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| tokio::spawn(svc.clone().oneshot(r)))
        .collect();
    for t in tasks {
        let res = t.await.unwrap().unwrap();
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes().len(),
            10
        );
    }
    api.calls()
}

/// coalesce.md:175-186: GET and HEAD with an empty body are coalesced, a GET with a body and other
/// methods are not; every header counts except `traceparent`, `tracestate`, `baggage`,
/// `x-request-id` and `x-correlation-id`; `.with_ignored_headers(names)` replaces that list.
#[tokio::test(start_paused = true)]
async fn what_is_coalesced_and_which_headers_tell_requests_apart() {
    let layer = CoalesceLayer::new();
    let same = |m: Method| (0..3).map(|_| req(m.clone(), &[], "")).collect::<Vec<_>>();
    assert_eq!(burst(&layer, same(Method::GET)).await, 1);
    assert_eq!(burst(&layer, same(Method::HEAD)).await, 1);
    for m in [
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
        Method::PATCH,
    ] {
        assert_eq!(burst(&layer, same(m.clone())).await, 3, "{m}");
    }
    let with_body = (0..3).map(|_| req(Method::GET, &[], "{\"q\":1}")).collect();
    assert_eq!(burst(&layer, with_body).await, 3);

    for ignored in [
        "traceparent",
        "tracestate",
        "baggage",
        "x-request-id",
        "x-correlation-id",
    ] {
        let reqs = (0..3)
            .map(|i| req(Method::GET, &[(ignored, ["a", "b", "c"][i])], ""))
            .collect();
        assert_eq!(burst(&layer, reqs).await, 1, "{ignored}");
    }
    for counted in [
        "authorization",
        "cookie",
        "x-api-key",
        "accept",
        "range",
        "if-none-match",
        "accept-encoding",
    ] {
        let reqs = (0..3)
            .map(|i| req(Method::GET, &[(counted, ["a", "b", "c"][i])], ""))
            .collect();
        assert_eq!(burst(&layer, reqs).await, 3, "{counted}");
    }
    // A header present on one request only also counts.
    let reqs = vec![
        req(Method::GET, &[], ""),
        req(Method::GET, &[("authorization", "Bearer x")], ""),
    ];
    assert_eq!(burst(&layer, reqs).await, 2);

    let replaced = CoalesceLayer::new().with_ignored_headers([HeaderName::from_static("x-nonce")]);
    let reqs = (0..3)
        .map(|i| req(Method::GET, &[("x-nonce", ["a", "b", "c"][i])], ""))
        .collect();
    assert_eq!(burst(&replaced, reqs).await, 1);
    let reqs = (0..3)
        .map(|i| req(Method::GET, &[("traceparent", ["a", "b", "c"][i])], ""))
        .collect();
    assert_eq!(burst(&replaced, reqs).await, 3);

    let only = CoalesceLayer::new().with_key_headers([http::header::AUTHORIZATION]);
    let reqs = (0..3)
        .map(|i| req(Method::GET, &[("accept", ["a", "b", "c"][i])], ""))
        .collect();
    assert_eq!(burst(&only, reqs).await, 1);
}

/// coalesce.md:201-206: each caller gets a `sturdy_core::Error` of the shared error's kind and
/// delivery, "with the message "the call shared by identical requests in flight failed: <the
/// error>"", whose chain holds a `SharedError` and then the shared error itself.
#[tokio::test(start_paused = true)]
async fn a_shared_error_reaches_every_caller_with_the_guides_words() {
    let api = Api::new(Act::Reset);
    let svc = CoalesceLayer::new().layer(api.clone());
    let tasks: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(req(Method::GET, &[], ""))))
        .collect();
    let original = std::io::Error::from(std::io::ErrorKind::ConnectionReset).to_string();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        let e = err
            .downcast_ref::<sturdy::core::Error>()
            .expect("a sturdy_core::Error");
        assert_eq!(*e.kind(), ErrorKind::Transport);
        assert_eq!(
            err.to_string(),
            format!("the call shared by identical requests in flight failed: {original}")
        );
        assert!(find::<SharedError>(&*err).is_some());
        let io = find::<std::io::Error>(&*err).expect("the io error in the chain");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
        assert_eq!(classify::delivery(&*err), Delivery::MaybeProcessed);
        assert_eq!(classify::classify_error(&*err), ErrorKind::Transport);
    }
    assert_eq!(api.calls(), 1);
}

/// coalesce.md:190-192: "If that `call` panics, the callers who joined get an error saying the
/// request that was to send the shared call failed before sending it (delivery: not sent), not a
/// hang."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_call_leaves_joined_callers_an_error_not_a_hang() {
    #[derive(Clone)]
    struct Panics;
    impl Service<Request<Full<Bytes>>> for Panics {
        type Response = Response<Full<Bytes>>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Response<Full<Bytes>>, BoxError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
            // Blocks on purpose: the second caller must arrive while the first is inside `call`.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(200));
            panic!("the inner service's call panicked");
        }
    }
    let svc = CoalesceLayer::new().layer(Panics);
    let first = tokio::spawn(svc.clone().oneshot(req(Method::GET, &[], "")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let joined = tokio::time::timeout(
        Duration::from_secs(1),
        svc.clone().oneshot(req(Method::GET, &[], "")),
    )
    .await
    .expect("the joined caller hangs");
    assert!(first.await.is_err(), "the first caller's task panicked");
    let err = joined.unwrap_err();
    assert_eq!(classify::delivery(&*err), Delivery::NotSent, "{err}");
    assert!(err.to_string().contains("before sending"), "{err}");
}

/// coalesce.md:192-200: the body is read once up to 1 MiB and every caller gets the same status,
/// headers and bytes; a larger body is not shared: the caller that started the call gets it, every
/// other caller sends its own request.
#[tokio::test(start_paused = true)]
async fn bodies_up_to_1_mib_are_shared_and_larger_ones_are_not() {
    const MIB: usize = 1024 * 1024;
    for (size, upstream) in [(MIB, 1), (MIB + 1, 3)] {
        let (layer, handle) = CoalesceLayer::new().pair();
        let api = Api::new(Act::Body(size));
        let svc = layer.layer(api.clone());
        let tasks: Vec<_> = (0..3)
            .map(|_| tokio::spawn(svc.clone().oneshot(req(Method::GET, &[], ""))))
            .collect();
        for t in tasks {
            let res = t.await.unwrap().unwrap();
            assert_eq!(res.headers()["x-served"], "yes");
            assert_eq!(
                res.into_body().collect().await.unwrap().to_bytes().len(),
                size
            );
        }
        assert_eq!(api.calls(), upstream, "{size}");
        let stats = handle.stats();
        assert_eq!(stats.calls(), 3);
        if size > MIB {
            assert_eq!(stats.too_large(), 1);
            assert_eq!(stats.fallbacks(), 2);
        } else {
            assert_eq!((stats.upstream(), stats.joined()), (1, 2));
        }
    }
}

/// coalesce.md:207-211: a caller that goes away leaves the call to the others; when the last one
/// leaves, the upstream call is dropped and leaves the table; the next identical request starts
/// afresh. :195: a request after the body was read starts a new call ("not a cache").
#[tokio::test(start_paused = true)]
async fn the_last_caller_leaving_drops_the_upstream_call() {
    let (layer, handle) = CoalesceLayer::new().pair();
    let api = Api::new(Act::Pending);
    let svc = layer.layer(api.clone());
    let a = tokio::spawn(svc.clone().oneshot(req(Method::GET, &[], "")));
    let b = tokio::spawn(svc.clone().oneshot(req(Method::GET, &[], "")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(api.calls(), 1);
    assert_eq!(handle.in_flight("api.example.com"), 1);
    a.abort();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        !api.dropped.load(Ordering::SeqCst),
        "dropped while a caller waits"
    );
    b.abort();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        api.dropped.load(Ordering::SeqCst),
        "the upstream call outlived its callers"
    );
    assert_eq!(handle.in_flight("api.example.com"), 0);
    let c = tokio::spawn(svc.clone().oneshot(req(Method::GET, &[], "")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(api.calls(), 2);
    c.abort();

    let api = Api::new(Act::Body(3));
    let svc = CoalesceLayer::new().layer(api.clone());
    for _ in 0..3 {
        let res = svc
            .clone()
            .oneshot(req(Method::GET, &[], ""))
            .await
            .unwrap();
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(api.calls(), 3);
}

/// coalesce.md:215-217: "A request that joins a call drops that ready service at once, which
/// gives back what it reserved (a `ConcurrencyLimit` permit, a `Buffer` slot)."
#[tokio::test(start_paused = true)]
async fn a_joining_request_gives_back_its_permit_at_once() {
    let api = Api::new(Act::Pending);
    let limited = tower::limit::ConcurrencyLimit::new(api.clone(), 2);
    let mut svc = CoalesceLayer::new().layer(limited);
    // A: the shared call, holding one permit.
    let a = svc.ready().await.unwrap().call(req(Method::GET, &[], ""));
    let a = tokio::spawn(a);
    tokio::time::sleep(Duration::from_millis(10)).await;
    // B: ready (the second permit), joins A.
    let b = svc.ready().await.unwrap().call(req(Method::GET, &[], ""));
    let b = tokio::spawn(b);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(api.calls(), 1);
    // C, another request: needs the permit B gave back.
    let ready = tokio::time::timeout(Duration::from_secs(1), svc.ready()).await;
    assert!(ready.is_ok(), "B still holds its permit");
    let c = tokio::spawn(
        ready.unwrap().unwrap().call(
            Request::get("http://api.example.com/other")
                .body(Full::default())
                .unwrap(),
        ),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(api.calls(), 2);
    a.abort();
    b.abort();
    c.abort();
}
