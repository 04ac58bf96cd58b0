#![cfg(feature = "full")]
//! s103: outside tests of the circuit breaker, request coalescing and per-host keys, read
//! against docs/guides/circuit.md, docs/guides/coalesce.md, docs/guides/metrics.md,
//! docs/RELIABILITY.md and the crates' rustdoc. Corners: half-open probes answered with a
//! status that is neither failure nor success, refusals from elsewhere (a nested breaker, a
//! local limit, tower's `LoadShed`) arriving through a shared (coalesced) call, the words of a
//! refusal near the end of an open period, per-host tables under any spelling, HEAD responses
//! that announce a large body, a kept service under `Timeout` + `Buffer` + `ConcurrencyLimit(1)`
//! cancelled at each await, and on the wire: a real axum server and a real HAProxy fault proxy
//! (gateway timeouts, connections reset without an answer) under the breaker and coalescing.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::{CoalesceLayer, SharedError};
use sturdy::core::classify::{classify_error, concerns_destination, delivery};
use sturdy::core::{BoxError, CircuitOpen, Delivery, ErrorKind, OpenReason, RateLimited};
use tokio::sync::{mpsc, oneshot};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

// ---------------------------------------------------------------- helpers

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

fn head(uri: &str) -> Request<Full<Bytes>> {
    Request::head(uri).body(Full::default()).unwrap()
}

fn status(code: u16) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .body(Full::default())
        .unwrap()
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An in-process API whose status is set by the test and whose calls are counted.
#[derive(Clone, Debug)]
struct Api {
    code: Arc<AtomicU16>,
    calls: Arc<AtomicUsize>,
}

impl Api {
    fn new(code: u16) -> Self {
        Self {
            code: Arc::new(AtomicU16::new(code)),
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }
    fn set(&self, code: u16) {
        self.code.store(code, Ordering::SeqCst);
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<Full<Bytes>>> for Api {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFut<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let code = self.code.load(Ordering::SeqCst);
        Box::pin(async move { Ok(status(code)) })
    }
}

fn open_of(err: &BoxError) -> &CircuitOpen {
    sturdy::core::find::<CircuitOpen>(&**err).unwrap_or_else(|| panic!("not a CircuitOpen: {err}"))
}

fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(" <- ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(5), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within 5 s"),
    }
}

/// Lets spawned tasks run until they are all parked.
async fn settle() {
    for _ in 0..30 {
        tokio::task::yield_now().await;
    }
}

fn is_open(s: Option<CircuitState>) -> bool {
    matches!(s, Some(CircuitState::Open { .. }))
}

// ---------------------------------------------------------------- a channel body and a manual API

/// A body whose frames the test sends.
#[derive(Debug)]
struct ChanBody(mpsc::UnboundedReceiver<Result<Frame<Bytes>, BoxError>>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx)
    }
}

fn whole(data: &[u8]) -> ChanBody {
    let (tx, rx) = mpsc::unbounded_channel();
    if !data.is_empty() {
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(data))))
            .unwrap();
    }
    ChanBody(rx)
}

/// A pending upstream call: the test answers it.
struct Pending {
    method: http::Method,
    answer: oneshot::Sender<Result<Response<ChanBody>, BoxError>>,
}

/// An API whose every call waits for the test's answer.
#[derive(Clone)]
struct Manual {
    pending: Arc<Mutex<Vec<Pending>>>,
    calls: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Manual {
    fn new() -> Self {
        Self {
            pending: Arc::new(Mutex::new(Vec::new())),
            calls: Arc::new(AtomicUsize::new(0)),
            dropped: Arc::new(AtomicUsize::new(0)),
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
    fn take(&self) -> Pending {
        let mut p = self.pending.lock().unwrap();
        p.retain(|c| !c.answer.is_closed());
        assert!(!p.is_empty(), "no upstream call is pending");
        p.remove(0)
    }
    fn live(&self) -> usize {
        let mut p = self.pending.lock().unwrap();
        p.retain(|c| !c.answer.is_closed());
        p.len()
    }
}

impl Service<Request<Full<Bytes>>> for Manual {
    type Response = Response<ChanBody>;
    type Error = BoxError;
    type Future = BoxFut<Result<Response<ChanBody>, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().push(Pending {
            method: req.method().clone(),
            answer: tx,
        });
        let guard = DropCount(self.dropped.clone());
        Box::pin(async move {
            let guard = guard;
            let r = match rx.await {
                Ok(r) => r,
                Err(_) => Err("the test dropped the answer".into()),
            };
            std::mem::forget(guard);
            r
        })
    }
}

// ---------------------------------------------------------------- circuit: probes

/// circuit.md: "4xx, 429 and 401 are not failures: they say nothing about the dependency's
/// health" and "Half-open: 1 probe at a time ... A failed probe reopens at once;
/// `.with_successes_to_close(m)` good probes close. A probe whose future is dropped gives its
/// slot back." A probe answered with a status that is not a failure (429, 404, 401, 400, 409,
/// 301) must not leave the only probe slot taken for ever: the next call reaches the
/// dependency (as a probe, or through a closed breaker), and a 200 then leaves it closed.
#[tokio::test(start_paused = true)]
async fn a_probe_answered_with_a_client_error_does_not_wedge_half_open() {
    for code in [429u16, 404, 401, 400, 409, 301, 408] {
        let api = Api::new(500);
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
            .pair();
        let svc = layer.layer(api.clone());
        svc.clone().oneshot(get("http://a.test/")).await.unwrap();
        assert!(is_open(handle.state("a.test")), "{code}");
        tokio::time::advance(Duration::from_millis(1001)).await;
        api.set(code);
        let res = svc.clone().oneshot(get("http://a.test/")).await.unwrap();
        assert_eq!(res.status().as_u16(), code);
        assert_eq!(api.calls(), 2);
        if code == 408 {
            // 408 reads as a timeout: a failed probe, reopened at once.
            assert!(
                is_open(handle.state("a.test")),
                "{:?}",
                handle.state("a.test")
            );
            continue;
        }
        api.set(200);
        let next = svc.clone().oneshot(get("http://a.test/")).await;
        assert!(
            next.is_ok(),
            "after a probe answered {code}, state {:?}: {}",
            handle.state("a.test"),
            next.as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        );
        assert_eq!(api.calls(), 3, "{code}");
        assert_eq!(handle.state("a.test"), Some(CircuitState::Closed), "{code}");
    }
}

/// circuit.md: "Whatever the classifier says, an error for a call that never reached the
/// dependency is not counted at all (neither failure nor success, and a probe gets its slot
/// back)"; classify.rs `concerns_destination`: "an open breaker ([`CircuitOpen`])". A breaker
/// stacked over another (per host over per tenant, say) that meets the inner one's forced
/// refusal counts nothing, and its own probe slot comes back: the next call is admitted again
/// and told by the inner breaker, not refused as `Probing` by the outer.
#[tokio::test(start_paused = true)]
async fn an_inner_breakers_refusal_is_not_counted_by_the_outer_one() {
    let api = Api::new(200);
    let (inner, inner_h) = CircuitBreakerLayer::new().pair();
    let (outer, outer_h) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let svc = ServiceBuilder::new()
        .layer(outer)
        .layer(inner)
        .service(api.clone());

    inner_h.force_open("a.test");
    for _ in 0..3 {
        let err = svc
            .clone()
            .oneshot(get("http://a.test/"))
            .await
            .unwrap_err();
        assert_eq!(open_of(&err).reason(), OpenReason::Forced, "{err}");
    }
    assert_eq!(outer_h.state("a.test"), Some(CircuitState::Closed));

    // The outer breaker opens on a real failure, then half-opens.
    inner_h.force_close("a.test");
    api.set(500);
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    assert!(is_open(outer_h.state("a.test")));
    tokio::time::advance(Duration::from_millis(1001)).await;
    inner_h.force_open("a.test");
    for i in 0..3 {
        let err = svc
            .clone()
            .oneshot(get("http://a.test/"))
            .await
            .unwrap_err();
        assert_eq!(
            open_of(&err).reason(),
            OpenReason::Forced,
            "try {i}: the outer probe slot was kept: {err}"
        );
    }
    inner_h.force_close("a.test");
    api.set(200);
    let res = svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(outer_h.state("a.test"), Some(CircuitState::Closed));
}

/// A service that fails every call with the error its mode names.
#[derive(Clone)]
struct Refuser {
    mode: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Service<Request<Full<Bytes>>> for Refuser {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = BoxFut<Result<Self::Response, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mode = self.mode.load(Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let e: BoxError = match mode {
                0 => Box::new(RateLimited::new(Duration::from_secs(1)).with_scope("a.test")),
                1 => Box::new(
                    sturdy::core::Error::new(ErrorKind::Timeout, "no access token within 5s")
                        .with_cause_elsewhere(),
                ),
                2 => Box::new(CircuitOpen::new("a.test", Duration::from_secs(5))),
                3 => Box::new(tower::load_shed::error::Overloaded::new()),
                _ => Box::new(io::Error::new(io::ErrorKind::ConnectionRefused, "refused")),
            };
            Err(e)
        })
    }
}

/// coalesce.md: each caller of a failed shared call "gets a `sturdy_core::Error` whose kind and
/// delivery are the shared error's ... `sturdy_core::find::<..>(&*err)` and `classify_error`
/// work as for the original"; circuit.md: "Whatever the classifier says, an error for a call
/// that never reached the dependency is not counted at all ... a local rate-limit refusal, a
/// full concurrency limit (sturdy's, or tower's `LoadShed` ...), a token the auth layer could
/// not get". A breaker over a coalescing layer (a per-host breaker in front of a shared
/// sub-stack) whose shared call was refused locally counts nothing, for every caller that
/// shared it; a refused connection shared the same way does count.
#[tokio::test(start_paused = true)]
async fn local_refusals_shared_by_coalescing_are_not_counted_by_a_breaker_above() {
    let names = [
        "RateLimited",
        "cause elsewhere",
        "CircuitOpen",
        "Overloaded",
    ];
    for (mode, name) in names.iter().enumerate() {
        let api = Refuser {
            mode: Arc::new(AtomicUsize::new(mode)),
            calls: Arc::new(AtomicUsize::new(0)),
        };
        let (cb, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .pair();
        let svc = ServiceBuilder::new()
            .layer(cb)
            .layer(CoalesceLayer::new())
            .service(api.clone());
        let mut tasks = Vec::new();
        for _ in 0..5 {
            tasks.push(tokio::spawn(svc.clone().oneshot(get("http://a.test/x"))));
        }
        for t in tasks {
            let err = t.await.unwrap().unwrap_err();
            assert!(
                sturdy::core::find::<SharedError>(&*err).is_some(),
                "{name}: {}",
                chain(&*err)
            );
            assert!(
                !concerns_destination(&*err),
                "{name}: concerns_destination says yes of {}",
                chain(&*err)
            );
            let original =
                sturdy::core::Error::new(ErrorKind::Timeout, "no access token within 5s")
                    .with_cause_elsewhere();
            if mode == 1 {
                assert_eq!(delivery(&*err), delivery(&original), "{name}");
            } else {
                assert_eq!(delivery(&*err), Delivery::NotSent, "{name}");
            }
        }
        assert_eq!(
            api.calls.load(Ordering::SeqCst),
            1,
            "{name}: one shared call"
        );
        assert_eq!(
            handle.state("a.test"),
            Some(CircuitState::Closed),
            "{name}: counted as a failure"
        );
    }
    // The control: a refused connection, shared, is a failure of the dependency.
    let api = Refuser {
        mode: Arc::new(AtomicUsize::new(9)),
        calls: Arc::new(AtomicUsize::new(0)),
    };
    let (cb, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = ServiceBuilder::new()
        .layer(cb)
        .layer(CoalesceLayer::new())
        .service(api);
    let err = svc
        .clone()
        .oneshot(get("http://a.test/x"))
        .await
        .unwrap_err();
    assert_eq!(classify_error(&*err), ErrorKind::Connect);
    assert!(is_open(handle.state("a.test")));
}

// ---------------------------------------------------------------- circuit: the words of a refusal

/// circuit.md: "`CircuitOpen::reason()` says why, and so does the message: `Failing` ("it has
/// been failing ... try again in 12s")"; error.rs `retry_in`: "When the breaker admits a probe
/// again". A refusal names the host and the cause, and its "try again in" agrees with
/// `retry_in` at every point of the open period, its last instants included: a caller told
/// "try again in 0s" while the breaker still refuses for 400 ms would try at once and be
/// refused again.
#[tokio::test(start_paused = true)]
async fn the_refusal_names_host_and_cause_and_its_wait_agrees_with_retry_in() {
    let api = Api::new(503);
    let (layer, _handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = layer.layer(api.clone());
    svc.clone()
        .oneshot(get("http://user:pw@API.Example.test:8443/v1?k=SECRET"))
        .await
        .unwrap();
    let mut done = 0u64;
    for (at, want) in [(0u64, "30s"), (12_000, "18s"), (29_600, "400ms")] {
        tokio::time::advance(Duration::from_millis(at - done)).await;
        done = at;
        let err = svc
            .clone()
            .oneshot(get("http://api.example.test:8443/v1"))
            .await
            .unwrap_err();
        let open = open_of(&err);
        let msg = err.to_string();
        assert_eq!(open.reason(), OpenReason::Failing);
        assert_eq!(open.key(), "api.example.test:8443");
        assert!(msg.contains("api.example.test:8443"), "{msg}");
        assert!(msg.contains("failing"), "{msg}");
        assert!(!msg.contains("SECRET") && !msg.contains("pw"), "{msg}");
        assert_eq!(
            open.retry_in(),
            Duration::from_millis(30_000 - at),
            "at {at} ms"
        );
        assert!(
            msg.ends_with(&format!("try again in {want}")),
            "at {at} ms (retry_in {:?}): {msg}",
            open.retry_in()
        );
    }
    assert_eq!(api.calls(), 1);
}

/// circuit.md: "`Probing` (half-open, its probes out: "try again once they have answered",
/// `retry_in` zero)". The words name the host too.
#[tokio::test(start_paused = true)]
async fn a_probing_refusal_names_the_host_and_says_when() {
    let m = Manual::new();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let svc = layer.layer(m.clone());
    let first = tokio::spawn(svc.clone().oneshot(get("http://b.test:81/")));
    settle().await;
    let _ = m.take().answer.send(Err(Box::new(io::Error::new(
        io::ErrorKind::ConnectionReset,
        "reset",
    ))));
    first.await.unwrap().unwrap_err();
    assert!(is_open(handle.state("b.test:81")));
    tokio::time::advance(Duration::from_millis(1000)).await;
    let probe = tokio::spawn(svc.clone().oneshot(get("http://b.test:81/")));
    settle().await;
    assert_eq!(m.calls(), 2);
    let err = svc
        .clone()
        .oneshot(get("http://B.TEST:81/"))
        .await
        .unwrap_err();
    let open = open_of(&err);
    assert_eq!(open.reason(), OpenReason::Probing);
    assert_eq!(open.retry_in(), Duration::ZERO);
    let msg = err.to_string();
    assert!(msg.contains("b.test:81"), "{msg}");
    assert!(msg.contains("once they have answered"), "{msg}");
    let _ = m.take().answer.send(Ok(Response::new(whole(b"ok"))));
    probe.await.unwrap().unwrap();
    assert_eq!(handle.state("B.test:81"), Some(CircuitState::Closed));
}

// ---------------------------------------------------------------- coalescing: per-host tables

/// coalesce.md: "Per host: each host (its name in any case) has its own table of calls in
/// flight" and "same URI as written ... a host written in capitals once and in lower case once
/// is two calls, in one table"; handle.rs: "a host given to a method here is found in any case".
/// The same for an IPv6 literal written in both cases, and for a port: `:8080` is another host.
#[tokio::test(start_paused = true)]
async fn one_table_per_host_in_any_spelling_two_calls_per_spelling() {
    let m = Manual::new();
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(m.clone());
    let uris = [
        "http://API.test/x",
        "http://api.test/x",
        "http://Api.Test/x",
        "http://[::ABCD]:8080/x",
        "http://[::abcd]:8080/x",
        "http://api.test:8080/x",
    ];
    let mut tasks = Vec::new();
    for u in uris {
        for _ in 0..3 {
            tasks.push(tokio::spawn(svc.clone().oneshot(get(u))));
        }
    }
    settle().await;
    assert_eq!(m.calls(), uris.len(), "one call per spelling");
    assert_eq!(handle.stats().joined(), 2 * uris.len() as u64);
    assert_eq!(handle.in_flight("api.test"), 3);
    assert_eq!(handle.in_flight("API.TEST"), 3);
    assert_eq!(handle.in_flight("[::AbCd]:8080"), 2);
    assert_eq!(handle.in_flight("api.test:8080"), 1);
    for _ in 0..uris.len() {
        let _ = m.take().answer.send(Ok(Response::new(whole(b"hi"))));
    }
    for t in tasks {
        let res = t.await.unwrap().unwrap();
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hi");
    }
    assert_eq!(handle.in_flight("api.test"), 0);
}

// ---------------------------------------------------------------- coalescing: HEAD

/// coalesce.md: "GET and HEAD requests ... are coalesced"; "a response whose body is larger
/// than the bound (by its size hint, or once more than the bound has arrived) is not shared".
/// A HEAD's response has no body, whatever `Content-Length` it announces: it is shared, and
/// every caller sees the announced length. A GET to the same URI is never joined with it.
#[tokio::test(start_paused = true)]
async fn a_head_announcing_a_large_body_is_shared() {
    let m = Manual::new();
    let (layer, handle) = CoalesceLayer::new().with_max_body(1024).pair();
    let svc = layer.layer(m.clone());
    let mut heads = Vec::new();
    for _ in 0..10 {
        heads.push(tokio::spawn(svc.clone().oneshot(head("http://a.test/f"))));
    }
    let g = tokio::spawn(svc.clone().oneshot(get("http://a.test/f")));
    settle().await;
    assert_eq!(m.calls(), 2, "one HEAD, one GET");
    let first = m.take();
    let second = m.take();
    let (h, g_call) = if first.method == http::Method::HEAD {
        (first, second)
    } else {
        (second, first)
    };
    let res = Response::builder()
        .header("content-length", "5242880")
        .body(whole(b""))
        .unwrap();
    let _ = h.answer.send(Ok(res));
    for t in heads {
        let res = within("a HEAD", t).await.unwrap().unwrap();
        assert_eq!(res.headers()["content-length"], "5242880");
        assert!(res
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
    }
    assert_eq!(
        m.calls(),
        2,
        "the HEAD callers sent their own: {:?}",
        handle.stats()
    );
    assert_eq!(handle.stats().too_large(), 0);
    let _ = g_call.answer.send(Ok(Response::new(whole(b"small"))));
    let res = g.await.unwrap().unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "small");
}

// ---------------------------------------------------------------- composition

/// README: "Every layer keeps tower's readiness contract, so the client (or any layer alone)
/// can sit under a `Buffer` or over a `ConcurrencyLimit`, driven by `oneshot` or a kept
/// `ready().await?.call(req)`"; circuit.md: "a dropped call is not counted", "A probe whose
/// future is dropped gives its slot back", "what it reserved in `poll_ready` (a
/// `ConcurrencyLimit`'s permit, a `Buffer`'s slot) is given back at once"; coalesce.md: "When
/// the last caller leaves, the upstream call is dropped ... and it leaves the table".
/// Timeout -> Buffer -> Coalesce -> CircuitBreaker -> ConcurrencyLimit(1) -> API, one kept
/// service, cancelled at each await: nothing is counted, kept or lost.
#[tokio::test(start_paused = true)]
async fn a_kept_service_under_timeout_and_buffer_cancelled_at_every_await() {
    let m = Manual::new();
    let (cb, cbh) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let (co, coh) = CoalesceLayer::new().pair();
    let inner = ServiceBuilder::new()
        .layer(co)
        .layer(cb)
        .concurrency_limit(1)
        .service(m.clone());
    let buffered = tower::buffer::Buffer::new(inner, 4);
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(2))
        .service(buffered);
    let svc = Arc::new(tokio::sync::Mutex::new(svc));

    async fn call(
        svc: &Arc<tokio::sync::Mutex<impl Service<Request<Full<Bytes>>, Error = BoxError>>>,
        uri: &str,
    ) -> Result<(), BoxError> {
        let fut = {
            let mut s = svc.lock().await;
            s.ready().await?;
            s.call(get(uri))
        };
        fut.await.map(|_| ())
    }

    // 1. Ready, then no call: the reservation is held by the kept service until its next call.
    {
        let mut s = svc.lock().await;
        s.ready().await.unwrap();
    }
    // 2. A call whose task is aborted while upstream: the upstream call is dropped, nothing
    //    stays in the table, nothing is counted.
    let t = {
        let svc = svc.clone();
        tokio::spawn(async move { call(&svc, "http://a.test/1").await })
    };
    settle().await;
    assert_eq!(m.live(), 1);
    t.abort();
    let _ = t.await;
    settle().await;
    assert_eq!(m.live(), 0, "aborted call still upstream");
    assert_eq!(coh.in_flight("a.test"), 0);
    assert_eq!(cbh.state("a.test"), Some(CircuitState::Closed));
    // 3. A call cut by the timeout above: not counted, and the permit comes back.
    let t = {
        let svc = svc.clone();
        tokio::spawn(async move { call(&svc, "http://a.test/2").await })
    };
    settle().await;
    assert_eq!(m.live(), 1);
    tokio::time::advance(Duration::from_millis(2001)).await;
    let err = within("timed out call", t).await.unwrap().unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    settle().await;
    assert_eq!(m.live(), 0);
    assert_eq!(coh.in_flight("a.test"), 0);
    assert_eq!(cbh.state("a.test"), Some(CircuitState::Closed));
    // 4. A call dropped before its first poll.
    {
        let mut s = svc.lock().await;
        s.ready().await.unwrap();
        drop(s.call(get("http://a.test/3")));
    }
    settle().await;
    // 5. A failure opens the breaker; the refusals give the permit back.
    let t = {
        let svc = svc.clone();
        tokio::spawn(async move { call(&svc, "http://a.test/4").await })
    };
    settle().await;
    let p = m.take();
    let _ = p.answer.send(Ok(Response::builder()
        .status(503)
        .body(whole(b""))
        .unwrap()));
    within("the 503", t).await.unwrap().unwrap();
    assert!(is_open(cbh.state("a.test")));
    for i in 0..5 {
        let err = within("a refusal", call(&svc, &format!("http://a.test/r{i}")))
            .await
            .unwrap_err();
        assert_eq!(open_of(&err).reason(), OpenReason::Failing, "{err}");
    }
    // 6. Half-open: the probe aborted mid-flight gives its slot back; the next call probes.
    tokio::time::advance(Duration::from_millis(1001)).await;
    let t = {
        let svc = svc.clone();
        tokio::spawn(async move { call(&svc, "http://a.test/p1").await })
    };
    settle().await;
    assert_eq!(m.live(), 1, "the probe is upstream");
    t.abort();
    let _ = t.await;
    settle().await;
    assert_eq!(m.live(), 0);
    // 7. The probe cut by the timeout above: its slot comes back too.
    let t = {
        let svc = svc.clone();
        tokio::spawn(async move { call(&svc, "http://a.test/p2").await })
    };
    settle().await;
    assert_eq!(m.live(), 1, "a second probe was admitted");
    tokio::time::advance(Duration::from_millis(2001)).await;
    within("the timed-out probe", t).await.unwrap().unwrap_err();
    settle().await;
    assert_eq!(cbh.state("a.test"), Some(CircuitState::HalfOpen));
    // 8. A probe that answers closes it.
    let t = {
        let svc = svc.clone();
        tokio::spawn(async move { call(&svc, "http://a.test/p3").await })
    };
    settle().await;
    let p = m.take();
    let _ = p.answer.send(Ok(Response::new(whole(b"ok"))));
    within("the probe", t).await.unwrap().unwrap();
    assert_eq!(cbh.state("a.test"), Some(CircuitState::Closed));
    assert_eq!(coh.in_flight("a.test"), 0);
    assert_eq!(m.live(), 0);
    assert!(m.dropped() >= 4, "dropped upstream calls: {}", m.dropped());
}

// ---------------------------------------------------------------- wire: axum and HAProxy

type HyperClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn hyper_client() -> HyperClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// Requests the axum server received, by path.
#[derive(Clone, Default)]
struct Hits(Arc<Mutex<std::collections::HashMap<String, usize>>>);

impl Hits {
    fn hit(&self, p: &str) {
        *self.0.lock().unwrap().entry(p.to_string()).or_default() += 1;
    }
    fn of(&self, p: &str) -> usize {
        self.0.lock().unwrap().get(p).copied().unwrap_or(0)
    }
}

async fn axum_server() -> (SocketAddr, Hits) {
    use axum::extract::{Path, State};
    use axum::routing::get as aget;
    let hits = Hits::default();
    async fn slow(State(h): State<Hits>) -> &'static str {
        h.hit("/slow");
        tokio::time::sleep(Duration::from_secs(3)).await;
        "late"
    }
    async fn big(State(h): State<Hits>) -> axum::response::Response {
        h.hit("/big");
        tokio::time::sleep(Duration::from_millis(100)).await;
        axum::response::Response::builder()
            .header("content-length", "5242880")
            .body(axum::body::Body::empty())
            .unwrap()
    }
    async fn chunked(State(h): State<Hits>, Path(n): Path<usize>) -> axum::response::Response {
        h.hit(&format!("/chunked/{n}"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let chunks: Vec<Result<Bytes, Infallible>> = (0..n)
            .step_by(4096)
            .map(|i| {
                Ok(Bytes::from(vec![
                    b'a' + (i / 4096 % 26) as u8;
                    (n - i).min(4096)
                ]))
            })
            .collect();
        axum::response::Response::new(axum::body::Body::from_stream(futures_util::stream::iter(
            chunks,
        )))
    }
    async fn held(State(h): State<Hits>) -> &'static str {
        h.hit("/held");
        tokio::time::sleep(Duration::from_millis(300)).await;
        "held"
    }
    async fn ok(State(h): State<Hits>) -> &'static str {
        h.hit("/ok");
        "fine"
    }
    let app = axum::Router::new()
        .route("/slow", aget(slow))
        .route("/big", axum::routing::head(big))
        .route("/chunked/{n}", aget(chunked))
        .route("/ok", aget(ok))
        .route("/held", aget(held))
        .with_state(hits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A HAProxy started by this test, stopped when dropped.
struct Haproxy {
    child: std::process::Child,
    dir: std::path::PathBuf,
    gateway: u16,
    reset: u16,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Frontends: `gateway` forwards to the axum server behind a 100 ms server timeout (so
/// `/slow` is a 504); `reset` reads each request and resets the connection without an answer.
async fn haproxy(backend: SocketAddr) -> Option<Haproxy> {
    let bin = [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())?;
    let (gateway, reset) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("s103-haproxy-{}-{}", std::process::id(), gateway));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = format!(
        "global\n    maxconn 500\n\
         defaults\n    mode http\n    timeout connect 1s\n    timeout client 10s\n    timeout server 10s\n\
         backend app_short\n    timeout server 100ms\n    server origin {backend}\n\
         frontend gateway\n    bind 127.0.0.1:{gateway}\n    default_backend app_short\n\
         frontend reset\n    bind 127.0.0.1:{reset}\n    option nolinger\n    http-request reject\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let child = std::process::Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let hp = Haproxy {
        child,
        dir,
        gateway,
        reset,
    };
    for _ in 0..100 {
        let a = tokio::net::TcpStream::connect(("127.0.0.1", gateway)).await;
        let b = tokio::net::TcpStream::connect(("127.0.0.1", reset)).await;
        if a.is_ok() && b.is_ok() {
            return Some(hp);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("HAProxy did not start");
}

/// circuit.md: "A failure is ... a 5xx ... a connect, TLS or transport error"; "Open:
/// `CircuitOpen { retry_in }` at once, and the inner service is not called". Through a real
/// HAProxy: its 504s (server timeout) and its resets without an answer open the breaker of the
/// proxy's host; the refusal names that host and the cause, and nothing more reaches HAProxy's
/// origin.
#[tokio::test]
async fn wire_haproxy_gateway_timeouts_and_resets_open_the_breaker() {
    let (addr, hits) = axum_server().await;
    let Some(hp) = haproxy(addr).await else {
        eprintln!("haproxy is not installed: skipped");
        return;
    };
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let svc = layer.layer(hyper_client());
    let gw = format!("http://127.0.0.1:{}/slow", hp.gateway);
    for _ in 0..3 {
        let res = within("a 504", svc.clone().oneshot(get(&gw)))
            .await
            .unwrap();
        assert_eq!(res.status(), 504);
    }
    let err = within("a refusal", svc.clone().oneshot(get(&gw)))
        .await
        .unwrap_err();
    let host = format!("127.0.0.1:{}", hp.gateway);
    assert_eq!(open_of(&err).key(), host);
    assert_eq!(open_of(&err).reason(), OpenReason::Failing);
    assert!(err.to_string().contains(&host), "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(hits.of("/slow"), 3);

    // Resets: a transport failure each.
    let rs = format!("http://127.0.0.1:{}/ok", hp.reset);
    for _ in 0..3 {
        let err = within("a reset", svc.clone().oneshot(get(&rs)))
            .await
            .unwrap_err();
        assert!(
            sturdy::core::find::<CircuitOpen>(&*err).is_none(),
            "{}",
            chain(&*err)
        );
        let k = classify_error(&*err);
        assert!(
            matches!(k, ErrorKind::Transport | ErrorKind::Connect),
            "{k:?}: {}",
            chain(&*err)
        );
    }
    let err = within("a refusal", svc.clone().oneshot(get(&rs)))
        .await
        .unwrap_err();
    assert_eq!(
        open_of(&err).key(),
        format!("127.0.0.1:{}", hp.reset),
        "{:?}",
        handle.states()
    );
    assert_eq!(hits.of("/ok"), 0);
    drop(hp);
}

/// coalesce.md: "Errors are shared too: ... the message "the call shared by identical requests
/// in flight failed: <the error>" (where the error's own text names no cause, as a hyper-util
/// client's `client error (SendRequest)` does, the words of `classify::describe` take its place
/// ...) ... `sturdy_core::find::<hyper::Error>(&*err)` and `classify_error` work as for the
/// original". Ten identical GETs through HAProxy's resetting frontend: one connection, and each
/// caller is told the cause, with the raw error's kind and delivery; a 504 from the gateway
/// frontend is one request at the origin, shared by all, and one failure to a breaker below.
#[tokio::test]
async fn wire_haproxy_a_shared_reset_and_a_shared_504() {
    let (addr, hits) = axum_server().await;
    let Some(hp) = haproxy(addr).await else {
        eprintln!("haproxy is not installed: skipped");
        return;
    };
    let rs = format!("http://127.0.0.1:{}/ok", hp.reset);
    // The raw error, for comparison.
    let raw = within("raw reset", hyper_client().oneshot(get(&rs)))
        .await
        .unwrap_err();
    let raw_kind = classify_error(&raw);
    let raw_delivery = delivery(&raw);

    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(hyper_client());
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(tokio::spawn(svc.clone().oneshot(get(&rs))));
    }
    for t in tasks {
        let err = within("a shared reset", t).await.unwrap().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("the call shared by identical requests in flight failed: "),
            "{msg}"
        );
        assert!(!msg.ends_with("client error (SendRequest)"), "{msg}");
        assert_eq!(classify_error(&*err), raw_kind, "{}", chain(&*err));
        assert_eq!(delivery(&*err), raw_delivery);
        assert!(
            sturdy::core::find::<hyper::Error>(&*err).is_some()
                || sturdy::core::find::<hyper::Error>(&raw).is_none()
        );
    }
    assert_eq!(handle.stats().upstream(), 1, "{:?}", handle.stats());
    assert_eq!(handle.stats().joined(), 9);

    // A shared 504, one failure to the breaker under the coalescing layer.
    let (cb, cbh) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new())
        .layer(cb)
        .service(hyper_client());
    let gw = format!("http://127.0.0.1:{}/slow", hp.gateway);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(tokio::spawn(svc.clone().oneshot(get(&gw))));
    }
    for t in tasks {
        let res = within("a shared 504", t).await.unwrap().unwrap();
        assert_eq!(res.status(), 504);
    }
    assert_eq!(hits.of("/slow"), 1);
    assert_eq!(
        cbh.state(&format!("127.0.0.1:{}", hp.gateway)),
        Some(CircuitState::Closed),
        "ten callers of one 504 counted as more than one failure"
    );
    drop(hp);
}

/// coalesce.md: "The response body is read once, into memory, up to 1 MiB
/// (`.with_max_body(bytes)`)" and "a response whose body is larger than the bound (by its size
/// hint, or once more than the bound has arrived) is not shared ... Every other caller sends its
/// own request". On the wire, with chunked bodies (no size hint): exactly the bound is one
/// request; one byte more is the leader's request plus one per other caller, each body whole.
/// A HEAD whose `Content-Length` announces 5 MiB is one request, shared.
#[tokio::test]
async fn wire_chunked_bodies_at_the_bound_and_a_large_head() {
    let (addr, hits) = axum_server().await;
    let max = 64 * 1024 + 7;
    for (n, want) in [(max, 1usize), (max + 1, 6)] {
        let (layer, handle) = CoalesceLayer::new().with_max_body(max).pair();
        let svc = layer.layer(hyper_client());
        let uri = format!("http://{addr}/chunked/{n}");
        let mut tasks = Vec::new();
        for _ in 0..6 {
            tasks.push(tokio::spawn(svc.clone().oneshot(get(&uri))));
        }
        for t in tasks {
            let res = within("a chunked GET", t).await.unwrap().unwrap();
            assert!(res.headers().get("content-length").is_none());
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), n);
            assert_eq!(body[0], b'a');
            assert_eq!(body[n - 1], b'a' + ((n - 1) / 4096 % 26) as u8);
        }
        assert_eq!(
            hits.of(&format!("/chunked/{n}")),
            want,
            "{n} bytes: {:?}",
            handle.stats()
        );
    }
    let (layer, handle) = CoalesceLayer::new().with_max_body(1024).pair();
    let svc = layer.layer(hyper_client());
    let uri = format!("http://{addr}/big");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(svc.clone().oneshot(head(&uri))));
    }
    for t in tasks {
        let res = within("a HEAD", t).await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-length"], "5242880");
    }
    assert_eq!(hits.of("/big"), 1, "{:?}", handle.stats());
}

// ---------------------------------------------------------------- more circuit corners

/// Spawns one call through `svc` and lets it reach the manual API.
async fn spawn_call<S>(svc: &S, uri: &str) -> tokio::task::JoinHandle<Result<u16, BoxError>>
where
    S: Service<Request<Full<Bytes>>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S: Service<Request<Full<Bytes>>, Response = Response<ChanBody>>,
{
    let svc = svc.clone();
    let uri = uri.to_string();
    let t = tokio::spawn(async move { svc.oneshot(get(&uri)).await.map(|r| r.status().as_u16()) });
    settle().await;
    t
}

/// circuit.md: "an attempt cut by a timer above the breaker ... is dropped, not failed, and a
/// dropped call is not counted"; "an error for a call that never reached the dependency is not
/// counted at all (neither failure nor success ...)". Not counted means not in the volume
/// either: with `with_failure_rate(0.5, 30 s, 2)`, ten dropped calls and ten local refusals
/// followed by two failures are two failures of two calls, which opens it. And a streak of
/// failures is not broken by a dropped call or a refusal between them.
#[tokio::test(start_paused = true)]
async fn dropped_calls_and_local_refusals_are_not_in_the_volume_or_the_streak() {
    let m = Manual::new();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::from_secs(30), 2)
        .unwrap()
        .pair();
    let svc = layer.layer(m.clone());
    for _ in 0..10 {
        let t = spawn_call(&svc, "http://a.test/").await;
        t.abort();
        let _ = t.await;
    }
    for _ in 0..10 {
        let t = spawn_call(&svc, "http://a.test/").await;
        let _ = m.take().answer.send(Err(Box::new(
            RateLimited::new(Duration::from_secs(1)).with_scope("a.test"),
        )));
        t.await.unwrap().unwrap_err();
    }
    for _ in 0..2 {
        let t = spawn_call(&svc, "http://a.test/").await;
        let _ = m.take().answer.send(Ok(Response::builder()
            .status(500)
            .body(whole(b""))
            .unwrap()));
        assert_eq!(t.await.unwrap().unwrap(), 500);
    }
    assert!(
        is_open(handle.state("a.test")),
        "two failures of two counted calls: {:?}",
        handle.state("a.test")
    );

    // The streak trigger: fail, dropped, refused, fail, fail -> open after the third failure.
    let m = Manual::new();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let svc = layer.layer(m.clone());
    let fail = |m: &Manual| {
        let _ = m.take().answer.send(Ok(Response::builder()
            .status(502)
            .body(whole(b""))
            .unwrap()));
    };
    let t = spawn_call(&svc, "http://b.test/").await;
    fail(&m);
    t.await.unwrap().unwrap();
    let t = spawn_call(&svc, "http://b.test/").await;
    t.abort();
    let _ = t.await;
    let t = spawn_call(&svc, "http://b.test/").await;
    let _ = m
        .take()
        .answer
        .send(Err(Box::new(tower::load_shed::error::Overloaded::new())));
    t.await.unwrap().unwrap_err();
    let t = spawn_call(&svc, "http://b.test/").await;
    fail(&m);
    t.await.unwrap().unwrap();
    assert_eq!(handle.state("b.test"), Some(CircuitState::Closed));
    let t = spawn_call(&svc, "http://b.test/").await;
    fail(&m);
    t.await.unwrap().unwrap();
    assert!(
        is_open(handle.state("b.test")),
        "{:?}",
        handle.state("b.test")
    );
}

/// circuit.md: "a timeout (from a timer under the breaker ...)" is a failure. tower's own
/// `Timeout` under the breaker: its `Elapsed` counts, and opens a streak breaker.
#[tokio::test(start_paused = true)]
async fn towers_timeout_under_the_breaker_counts() {
    let m = Manual::new();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .timeout(Duration::from_millis(100))
        .service(m.clone());
    for _ in 0..2 {
        let err = within(
            "a timed-out call",
            svc.clone().oneshot(get("http://a.test/")),
        )
        .await
        .unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    }
    assert!(
        is_open(handle.state("a.test")),
        "{:?}",
        handle.state("a.test")
    );
    let err = svc
        .clone()
        .oneshot(get("http://a.test/"))
        .await
        .unwrap_err();
    assert_eq!(open_of(&err).reason(), OpenReason::Failing);
    assert_eq!(m.calls(), 2);
}

/// circuit.md: "Half-open: 1 probe at a time (`.with_probes(k)`) ... `.with_successes_to_close(m)`
/// good probes close. A probe whose future is dropped gives its slot back." With two probes and
/// two successes to close: one probe answers 200, the other is cut by a timer above (its slot
/// comes back, and it is no failure); a third probe answering 200 is the second success.
#[tokio::test(start_paused = true)]
async fn successes_add_up_across_a_dropped_probe() {
    let m = Manual::new();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .with_probes(2)
        .with_successes_to_close(2)
        .pair();
    let svc = layer.layer(m.clone());
    let t = spawn_call(&svc, "http://a.test/").await;
    let _ = m.take().answer.send(Ok(Response::builder()
        .status(503)
        .body(whole(b""))
        .unwrap()));
    t.await.unwrap().unwrap();
    tokio::time::advance(Duration::from_millis(1001)).await;
    let p1 = spawn_call(&svc, "http://a.test/").await;
    let p2 = spawn_call(&svc, "http://a.test/").await;
    assert_eq!(m.calls(), 3);
    let err = svc
        .clone()
        .oneshot(get("http://a.test/"))
        .await
        .unwrap_err();
    assert_eq!(open_of(&err).reason(), OpenReason::Probing);
    // p1 answers 200: one success of two.
    let _ = m.take().answer.send(Ok(Response::new(whole(b"ok"))));
    assert_eq!(p1.await.unwrap().unwrap(), 200);
    assert_eq!(handle.state("a.test"), Some(CircuitState::HalfOpen));
    // p2 is dropped.
    p2.abort();
    let _ = p2.await;
    settle().await;
    assert_eq!(handle.state("a.test"), Some(CircuitState::HalfOpen));
    // Two slots free again: a third probe, the second success.
    let p3 = spawn_call(&svc, "http://a.test/").await;
    let p4 = spawn_call(&svc, "http://a.test/").await;
    assert_eq!(m.calls(), 5, "both slots came back");
    let _ = m.take().answer.send(Ok(Response::new(whole(b"ok"))));
    assert_eq!(p3.await.unwrap().unwrap(), 200);
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
    let _ = m.take().answer.send(Ok(Response::new(whole(b"ok"))));
    assert_eq!(p4.await.unwrap().unwrap(), 200);
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
}

/// circuit.md: "One breaker per host (its name in any case ...) ... at most 1,024
/// (`.with_max_breakers(n)`); past it, healthy breakers (closed, with no failure streak) are
/// forgotten first, then new hosts share one overflow breaker"; key.rs: "The port is part of the
/// key as written"; the URI's `user:password@` is never part of it. Spellings of one host take
/// one place in the bound; a port written out is another host; the first host past the bound
/// shares `*`.
#[tokio::test(start_paused = true)]
async fn spellings_of_one_host_take_one_place_in_the_bound() {
    let api = Api::new(500);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(100)
        .with_max_breakers(4)
        .pair();
    let svc = layer.layer(api.clone());
    for uri in [
        "http://API.test/",
        "http://api.TEST/x",
        "http://user:pw@Api.Test/",
        "http://[::AB]:80/",
        "http://[::ab]:80/",
        "http://u@[::Ab]:80/",
        "http://api.test:80/",
    ] {
        svc.clone().oneshot(get(uri)).await.unwrap();
    }
    let keys: Vec<String> = handle.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["[::ab]:80", "api.test", "api.test:80"], "{keys:?}");
    // Every breaker has a failure streak: none may be forgotten. Two hosts more.
    svc.clone().oneshot(get("http://c.test/")).await.unwrap();
    svc.clone().oneshot(get("http://d.test/")).await.unwrap();
    let keys: Vec<String> = handle.states().into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&"*".to_string()), "{keys:?}");
    for k in ["api.test", "[::ab]:80", "api.test:80", "c.test"] {
        assert!(
            keys.contains(&k.to_string()),
            "{k} was forgotten with a streak: {keys:?}"
        );
    }
    assert_eq!(handle.state("D.TEST"), handle.state("*"));
}

/// circuit.md: "One breaker per host ... created lazily, at most 1,024
/// (`.with_max_breakers(n)`)"; layer.rs `with_max_breakers`: "The most breakers kept";
/// keyed.rs `KeyedMap::new`: "Once made, the overflow slot counts among the `max`, so `max - 1`
/// keys of their own are kept besides it." With a bound of 4 and five hosts whose breakers all
/// hold a failure streak, the handle lists five breakers: four of their own and `*`.
///
/// Resolved in the docs: circuit.md and `with_max_breakers` now say the overflow breaker is kept
/// besides the `n` (a breaker that holds failures is never forgotten to make room for it).
#[tokio::test(start_paused = true)]
async fn the_overflow_breaker_counts_among_the_most_kept() {
    let api = Api::new(500);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(100)
        .with_max_breakers(4)
        .pair();
    let svc = layer.layer(api.clone());
    for h in ["a", "b", "c", "d", "e", "f"] {
        svc.clone()
            .oneshot(get(&format!("http://{h}.test/")))
            .await
            .unwrap();
    }
    let keys: Vec<String> = handle.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), 5, "four of their own and `*`: {keys:?}");
    assert!(keys.contains(&"*".to_string()), "{keys:?}");
}

/// coalesce.md: "at most 1,024 tables (`.with_max_hosts(n)`) ... Past the bound, new keys share
/// one table". Spellings of one host take one table: with a bound of 3, `A.test`, `a.test`,
/// `b.test` and `c.test` in flight at once all keep tables of their own.
#[tokio::test(start_paused = true)]
async fn spellings_of_one_host_take_one_table() {
    let m = Manual::new();
    let (layer, handle) = CoalesceLayer::new().with_max_hosts(3).pair();
    let svc = layer.layer(m.clone());
    let mut tasks = Vec::new();
    for u in [
        "http://A.test/x",
        "http://a.test/x",
        "http://a.TEST/y",
        "http://b.test/x",
        "http://c.test/x",
    ] {
        tasks.push(tokio::spawn(svc.clone().oneshot(get(u))));
    }
    settle().await;
    assert_eq!(m.calls(), 5);
    assert_eq!(handle.in_flight("a.test"), 3);
    assert_eq!(handle.in_flight("b.test"), 1);
    assert_eq!(
        handle.in_flight("c.test"),
        1,
        "c.test spilled into the overflow table"
    );
    assert_eq!(handle.in_flight("*"), 0);
    for _ in 0..5 {
        let _ = m.take().answer.send(Ok(Response::new(whole(b"x"))));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// coalesce.md: "past 30 s from the head (`.with_body_timeout(d)` ...), each caller gets a
/// `Timeout` error ("the shared response's body did not arrive within 30s of its head")";
/// layer.rs: "The timer ... runs from that first wait ...; later frames do not restart it". A
/// body that trickles one frame every 10 s and never ends is cut 30 s after the head for every
/// caller, and the next identical request starts afresh.
#[tokio::test(start_paused = true)]
async fn a_trickling_shared_body_is_cut_thirty_seconds_after_the_head() {
    let m = Manual::new();
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(m.clone());
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(svc.clone().oneshot(get("http://a.test/t"))));
    }
    settle().await;
    assert_eq!(m.calls(), 1);
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = m.take().answer.send(Ok(Response::new(ChanBody(rx))));
    let start = tokio::time::Instant::now();
    let feeder = tokio::spawn(async move {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if tx
                .send(Ok(Frame::data(Bytes::from_static(b"tick"))))
                .is_err()
            {
                return;
            }
        }
        // keep it open
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(tx);
    });
    for t in tasks {
        let err = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a trickled shared body: not cut within 60 s")
            .unwrap()
            .unwrap_err();
        assert_eq!(classify_error(&*err), ErrorKind::Timeout, "{err}");
        assert!(
            err.to_string()
                .contains("the shared response's body did not arrive within 30s of its head"),
            "{err}"
        );
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(30) && took < Duration::from_secs(31),
        "{took:?}"
    );
    assert_eq!(handle.in_flight("a.test"), 0);
    feeder.abort();
    let t = tokio::spawn(svc.clone().oneshot(get("http://a.test/t")));
    settle().await;
    assert_eq!(m.calls(), 2);
    let _ = m.take().answer.send(Ok(Response::new(whole(b"fresh"))));
    let res = t.await.unwrap().unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "fresh");
}

/// README's layer order ("Coalesce -> ... Retry -> ... CircuitBreaker"), coalesce.md: "identical
/// calls share one whole outcome, retries included"; circuit.md: "With the retry layer above it
/// ..., a call that meets an open breaker fails at once unless it has a deadline"; coalesce.md:
/// "When the shared error carries a `CallReport` ..., the caller's error carries a copy". Ten
/// identical GETs through a `ClientBuilder` stack and a real HAProxy answering 504: the shared
/// call's attempts open the breaker (streak of 3), its next try is refused, and every caller
/// gets one outcome naming the host, with the three attempts in its report; the origin saw
/// three requests.
#[tokio::test]
async fn wire_client_builder_coalesced_retries_meet_the_breaker_they_opened() {
    let (addr, hits) = axum_server().await;
    let Some(hp) = haproxy(addr).await else {
        eprintln!("haproxy is not installed: skipped");
        return;
    };
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let (coalesce, stats) = CoalesceLayer::new().pair();
    let retry = sturdy::retry::RetryLayer::new()
        .with_backoff(
            sturdy::retry::Backoff::exponential(
                Duration::from_millis(10),
                Duration::from_millis(20),
            )
            .unwrap(),
        )
        .with_seed(103);
    let client = sturdy::ClientBuilder::new()
        .with_retry(retry)
        .with_circuit_breaker(breaker)
        .with_coalesce(coalesce)
        .build(hyper_client());
    let host = format!("127.0.0.1:{}", hp.gateway);
    let uri = format!("http://{host}/slow");
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(client.clone().oneshot(get(&uri))))
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(within("a coalesced call", t).await.unwrap());
    }
    assert_eq!(hits.of("/slow"), 3, "{:?}", stats.stats());
    assert!(is_open(handle.state(&host)), "{:?}", handle.states());
    assert_eq!(stats.stats().upstream(), 1, "{:?}", stats.stats());
    let first = format!(
        "{:?}",
        outcomes[0]
            .as_ref()
            .map(|r| r.status())
            .map_err(|e| e.to_string())
    );
    for o in &outcomes {
        match o {
            Ok(res) => assert_eq!(res.status(), 504),
            Err(err) => {
                let msg = err.to_string();
                assert!(msg.contains(&host), "{msg}");
                let top = err
                    .downcast_ref::<sturdy::core::Error>()
                    .unwrap_or_else(|| panic!("not a sturdy error: {msg}"));
                let report = top.report().unwrap_or_else(|| panic!("no report: {msg}"));
                assert_eq!(report.attempts(), 3, "{msg}");
            }
        }
        let this = format!(
            "{:?}",
            o.as_ref().map(|r| r.status()).map_err(|e| e.to_string())
        );
        assert_eq!(this, first);
    }
    eprintln!("outcome: {first}");
    drop(hp);
}

/// An API answering the codes of `seq` in turn (the last one for ever), counting calls.
#[derive(Clone)]
struct Seq {
    seq: Arc<Vec<u16>>,
    calls: Arc<AtomicUsize>,
}

impl Seq {
    fn new(seq: &[u16]) -> Self {
        Self {
            seq: Arc::new(seq.to_vec()),
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<Full<Bytes>>> for Seq {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFut<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let code = *self.seq.get(n).unwrap_or(self.seq.last().unwrap());
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(Response::builder()
                .status(code)
                .body(Full::new(Bytes::from(format!("answer {n}"))))
                .unwrap())
        })
    }
}

/// coalesce.md: "Leaving: a caller that goes away (its future dropped, a timeout above it)
/// leaves the call to the others; it goes on. When the last caller leaves, the upstream call is
/// dropped"; "Outermost, so identical calls share one whole outcome, retries included". In a
/// `ClientBuilder` stack, the caller that started the shared call goes away while the retry
/// layer sleeps between attempts: the others still get the retried answer, from one retry. When
/// every caller goes away during that sleep, no retry is sent.
#[tokio::test(start_paused = true)]
async fn the_leader_leaving_during_the_retry_sleep_leaves_the_retry_to_the_others() {
    let make = |api: Seq| {
        let retry = sturdy::retry::RetryLayer::new()
            .with_backoff(
                sturdy::retry::Backoff::exponential(Duration::from_secs(1), Duration::from_secs(1))
                    .unwrap(),
            )
            .with_seed(103);
        let (coalesce, stats) = CoalesceLayer::new().pair();
        let client = sturdy::ClientBuilder::new()
            .with_retry(retry)
            .with_coalesce(coalesce)
            .build(api);
        (client, stats)
    };
    let api = Seq::new(&[503, 200]);
    let (client, stats) = make(api.clone());
    let leader = tokio::spawn(client.clone().oneshot(get("http://a.test/r")));
    settle().await;
    let followers: Vec<_> = (0..5)
        .map(|_| tokio::spawn(client.clone().oneshot(get("http://a.test/r"))))
        .collect();
    settle().await;
    tokio::time::advance(Duration::from_millis(150)).await;
    settle().await;
    assert_eq!(api.calls(), 1, "the first attempt answered 503");
    leader.abort();
    let _ = leader.await;
    for f in followers {
        let res = within("a follower", f).await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "answer 1"
        );
    }
    assert_eq!(api.calls(), 2);
    assert_eq!(stats.stats().upstream(), 1);
    assert_eq!(stats.stats().joined(), 5);

    // Everyone leaves during the sleep: no second attempt.
    let api = Seq::new(&[503, 200]);
    let (client, stats) = make(api.clone());
    let callers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client.clone().oneshot(get("http://a.test/r"))))
        .collect();
    settle().await;
    tokio::time::advance(Duration::from_millis(150)).await;
    settle().await;
    assert_eq!(api.calls(), 1);
    for c in callers {
        c.abort();
        let _ = c.await;
    }
    tokio::time::advance(Duration::from_secs(5)).await;
    settle().await;
    assert_eq!(api.calls(), 1, "a retry was sent for nobody");
    assert_eq!(stats.in_flight("a.test"), 0);
}

/// metrics.md (Labels): "a call refused by the overflow breaker or the overflow rate limit is
/// counted under `*`, and its error says that it met the breaker or limiter the hosts past the
/// bound share"; circuit.md: "`Overflow` (the call's host shares the overflow breaker of the
/// hosts past `with_max_breakers`, which has been failing; the message names the call's own
/// host)". In a `ClientBuilder` stack (the retry layer above the breaker), a host past the bound
/// fails once, the overflow breaker (opened by another host's failures with it) refuses its
/// retry: the error the caller reads must say it met the shared breaker, not that its own host's
/// breaker is open. (A first try refused outright does say so: "it shares the overflow breaker
/// of the hosts past the most breakers kept".)
#[tokio::test(start_paused = true)]
async fn a_retry_refused_by_the_overflow_breaker_says_so_under_the_client_builder() {
    let api = Api::new(503);
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .with_max_breakers(1)
        .pair();
    let retry = sturdy::retry::RetryLayer::new().with_backoff(
        sturdy::retry::Backoff::exponential(Duration::from_millis(10), Duration::from_millis(10))
            .unwrap(),
    );
    let client = sturdy::ClientBuilder::new()
        .with_retry(retry)
        .with_circuit_breaker(breaker)
        .build(api.clone());
    let once = |uri: &str| {
        let mut r = get(uri);
        r.extensions_mut()
            .insert(sturdy::core::CallOptions::new().without_retries());
        r
    };
    // a.test keeps the one breaker of its own; y.test fails twice in the overflow breaker.
    let _ = client.clone().oneshot(once("http://a.test/")).await;
    let _ = client.clone().oneshot(once("http://y.test/")).await;
    let _ = client.clone().oneshot(once("http://y.test/")).await;
    assert_eq!(handle.state("*"), Some(CircuitState::Closed));
    // z.test: one 503 (the overflow breaker's third failure in a row), then its retry is refused.
    let err = client
        .clone()
        .oneshot(get("http://z.test/"))
        .await
        .map(|r| r.status())
        .unwrap_err();
    assert!(is_open(handle.state("*")));
    assert_eq!(api.calls(), 4);
    let open = open_of(&err);
    assert_eq!(open.reason(), OpenReason::Overflow);
    assert_eq!(open.key(), "z.test");
    let msg = err.to_string();
    assert!(msg.contains("z.test"), "{msg}");
    assert!(
        msg.contains("overflow") || msg.contains("past the most breakers kept"),
        "the words do not say the breaker is the one shared past the bound: {msg}"
    );
}

/// circuit.md: "`CircuitOpen::reason()` says why, and so does the message: ... `Forced` (held
/// open through the handle until released)"; error.rs `retry_in`: "the longest open period for
/// a forced breaker". Under the retry layer, a host isolated by hand between a call's first
/// attempt and its retry: the caller's error says the breaker was forced open (not that it will
/// reopen in five minutes, which nobody knows).
#[tokio::test(start_paused = true)]
async fn a_retry_refused_by_a_forced_breaker_says_it_is_held_open() {
    let m = Manual::new();
    let (breaker, handle) = CircuitBreakerLayer::new().pair();
    let retry = sturdy::retry::RetryLayer::new().with_backoff(
        sturdy::retry::Backoff::exponential(Duration::from_secs(1), Duration::from_secs(1))
            .unwrap(),
    );
    let client = sturdy::ClientBuilder::new()
        .with_retry(retry)
        .with_circuit_breaker(breaker)
        .build(m.clone());
    let t = tokio::spawn(client.clone().oneshot(get("http://f.test/")));
    settle().await;
    let _ = m.take().answer.send(Ok(Response::builder()
        .status(503)
        .body(whole(b""))
        .unwrap()));
    settle().await;
    handle.force_open("F.test");
    tokio::time::advance(Duration::from_secs(2)).await;
    let err = within("the call", t)
        .await
        .unwrap()
        .map(|r| r.status())
        .unwrap_err();
    assert_eq!(m.calls(), 1);
    let open = open_of(&err);
    assert_eq!(open.reason(), OpenReason::Forced);
    let msg = err.to_string();
    assert!(msg.contains("f.test"), "{msg}");
    assert!(
        msg.contains("forced") || msg.contains("handle"),
        "the words do not say the breaker is held open by hand: {msg}"
    );
}

/// coalesce.md: "Behind `SturdyMiddleware` (reqwest), a shared call's attempts are sent by the
/// middleware call of the caller who started it, and cannot outlive that caller: when it goes
/// away, the attempt in flight is cut off, and each caller who joined sends its own request
/// (counted in `fallbacks`), so the server may see the request again." On the wire: the leader's
/// reqwest call is dropped mid-flight; the five callers who joined each get the answer, and the
/// counters say they fell back.
#[tokio::test]
async fn wire_reqwest_leader_dropped_mid_flight_the_joined_send_their_own() {
    let (addr, hits) = axum_server().await;
    let (coalesce, handle) = CoalesceLayer::new().pair();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(sturdy::reqwest::SturdyMiddleware::new(move |next| {
            sturdy::ClientBuilder::new()
                .with_coalesce(coalesce)
                .build(next)
        }))
        .build();
    let url = format!("http://{addr}/held");
    let leader = {
        let (c, u) = (client.clone(), url.clone());
        tokio::spawn(async move { c.get(u).send().await.map(|r| r.status()) })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let followers: Vec<_> = (0..5)
        .map(|_| {
            let (c, u) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let res = c.get(u).send().await?;
                let st = res.status();
                Ok::<_, reqwest_middleware::Error>((st, res.text().await?))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(handle.stats().joined(), 5, "{:?}", handle.stats());
    leader.abort();
    let _ = leader.await;
    for f in followers {
        let (st, body) = within("a follower", f).await.unwrap().unwrap();
        assert_eq!(st, 200);
        assert_eq!(body, "held");
    }
    let s = handle.stats();
    assert_eq!(s.fallbacks(), 5, "{s:?}");
    assert!(hits.of("/held") >= 2, "{}", hits.of("/held"));
    assert_eq!(
        hits.of("/held"),
        6,
        "each caller who joined sends its own: {s:?}"
    );
}
