//! Outside tests of request coalescing, against docs/guides/coalesce.md and the rustdoc of
//! `sturdy_coalesce`. Paused time, in-process services.
#![cfg(feature = "full")]

use crate::outsider4_common;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use outsider4_common::*;
use sturdy::coalesce::{CoalesceLayer, ResponseBody, SharedError};
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, Delivery};
use sturdy::ClientBuilder;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const HOST: &str = "api.example.com";

fn url(path: &str) -> String {
    format!("http://{HOST}{path}")
}

type Outer = BoxCloneSyncService<Request<Body>, Response<ResponseBody<Body>>, BoxError>;
type Pending =
    futures_util::future::BoxFuture<'static, Result<Response<ResponseBody<Body>>, BoxError>>;

async fn text<B>(res: Response<B>) -> Bytes
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    res.into_body().collect().await.unwrap().to_bytes()
}

/// An inner service whose first `call` sends an identical request through the coalescing
/// service above it (while it is still inside its own `call`), keeps that request's future, and
/// then either returns a slow response or panics.
struct Reentrant {
    outer: Arc<Mutex<Option<Outer>>>,
    joined: Arc<Mutex<Option<Pending>>>,
    calls: Arc<AtomicUsize>,
}

fn reentrant(panic_in_call: bool) -> (Outer, Reentrant, sturdy::coalesce::CoalesceHandle) {
    let r = Reentrant {
        outer: Arc::new(Mutex::new(None)),
        joined: Arc::new(Mutex::new(None)),
        calls: Arc::new(AtomicUsize::new(0)),
    };
    let (outer_slot, joined_slot, calls) = (r.outer.clone(), r.joined.clone(), r.calls.clone());
    let inner = tower::service_fn(move |req: Request<Body>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        if n == 0 {
            let mut outer = outer_slot.lock().unwrap().clone().expect("outer set");
            let same = Request::get(req.uri().clone())
                .body(Body::default())
                .unwrap();
            // The inner service of the coalescing layer is a service_fn: always ready.
            outer
                .ready()
                .now_or_never()
                .expect("ready at once")
                .expect("ready");
            let fut: Pending = Box::pin(outer.call(same));
            *joined_slot.lock().unwrap() = Some(fut);
            if panic_in_call {
                panic!("the inner service's call panicked on purpose");
            }
        }
        async move {
            tokio::time::sleep(ms(50)).await;
            Ok::<_, BoxError>(Response::new(Body::from(format!("answer {n}"))))
        }
    });
    let (layer, handle) = CoalesceLayer::new().pair();
    let outer: Outer = BoxCloneSyncService::new(layer.layer(inner));
    *r.outer.lock().unwrap() = Some(outer.clone());
    (outer, r, handle)
}

/// "an identical request that arrives while that call is in flight waits for it instead of
/// calling, also one that arrives while the first is still inside the inner service's `call`".
#[tokio::test(start_paused = true)]
async fn a_request_made_while_the_first_is_inside_call_joins_it() {
    let (mut svc, r, handle) = reentrant(false);
    let lead = svc.ready().await.unwrap().call(get(&url("/report")));
    let joined = r
        .joined
        .lock()
        .unwrap()
        .take()
        .expect("the inner call made a second request");
    let (a, b) = bounded(async { tokio::join!(lead, joined) }).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(text(a).await, "answer 0");
    assert_eq!(
        text(b).await,
        "answer 0",
        "the second request joined the first"
    );
    assert_eq!(r.calls.load(Ordering::SeqCst), 1, "one upstream call");
    let s = handle.stats();
    assert_eq!((s.upstream(), s.joined()), (1, 1), "{s:?}");
}

/// "If that `call` panics, the callers who joined get an error saying the request that was to
/// send the shared call failed before sending it (delivery: not sent), not a hang."
#[tokio::test(start_paused = true)]
async fn callers_who_joined_a_call_that_panicked_in_call_get_a_not_sent_error() {
    let (mut svc, r, handle) = reentrant(true);
    svc.ready().await.unwrap();
    let lead = std::panic::catch_unwind(AssertUnwindSafe(|| svc.call(get(&url("/report")))));
    assert!(
        lead.is_err(),
        "the leader's call panicked, as the inner call did"
    );
    let joined = r.joined.lock().unwrap().take().expect("a joined request");
    let err = tokio::time::timeout(secs(60), joined)
        .await
        .expect("the caller who joined was left hanging")
        .expect_err("the caller who joined cannot have a response");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{}", chain(&*err));
    assert!(
        chain(&*err).contains("failed before sending it"),
        "the error says what happened: {}",
        chain(&*err)
    );
    // Nothing is left in the table: the next identical request starts afresh.
    assert_eq!(handle.in_flight(HOST), 0);
    let mut svc2 = svc.clone();
    let res = bounded(svc2.ready().await.unwrap().call(get(&url("/report"))))
        .await
        .unwrap();
    assert_eq!(text(res).await, "answer 1");
}

/// A scripted, counted inner service whose futures record being dropped before they finish.
#[derive(Clone, Default)]
struct Probe {
    calls: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
}

struct DropFlag(Arc<AtomicUsize>, bool);
impl DropFlag {
    fn finish(&mut self) {
        self.1 = true;
    }
}
impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Probe {
    fn service(
        &self,
        delay: Duration,
        body: &'static str,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future = BoxFut>
           + Clone
           + Send
           + Sync
           + 'static {
        let p = self.clone();
        tower::service_fn(move |_req: Request<Body>| -> BoxFut {
            p.calls.fetch_add(1, Ordering::SeqCst);
            let mut flag = DropFlag(p.cancelled.clone(), false);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                flag.finish();
                Ok(Response::new(Body::from(body)))
            })
        })
    }
}

/// "a caller that goes away ... leaves the call to the others; it goes on. When the last caller
/// leaves, the upstream call is dropped, which cancels it ... and it leaves the table ... The
/// next identical request starts afresh."
#[tokio::test(start_paused = true)]
async fn leaving_and_the_last_caller_cancelling() {
    let probe = Probe::default();
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(probe.service(secs(1), "page"));

    // The leader leaves; the one who joined still gets the answer, from the same call.
    let mut lead = Box::pin(svc.clone().oneshot(get(&url("/a"))));
    assert!(lead.as_mut().now_or_never().is_none());
    let follower = tokio::spawn(svc.clone().oneshot(get(&url("/a"))));
    tokio::task::yield_now().await;
    drop(lead);
    let res = bounded(follower).await.unwrap().unwrap();
    assert_eq!(text(res).await, "page");
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        probe.cancelled.load(Ordering::SeqCst),
        0,
        "the call went on"
    );

    // Everyone leaves: the call is cancelled and leaves the table.
    let mut a = Box::pin(svc.clone().oneshot(get(&url("/b"))));
    let mut b = Box::pin(svc.clone().oneshot(get(&url("/b"))));
    assert!(a.as_mut().now_or_never().is_none());
    assert!(b.as_mut().now_or_never().is_none());
    assert_eq!(handle.in_flight(HOST), 1);
    drop(a);
    assert_eq!(
        probe.cancelled.load(Ordering::SeqCst),
        0,
        "one caller is left"
    );
    drop(b);
    assert_eq!(
        probe.cancelled.load(Ordering::SeqCst),
        1,
        "the upstream call was dropped"
    );
    assert_eq!(handle.in_flight(HOST), 0, "and left the table");
    let res = bounded(svc.clone().oneshot(get(&url("/b")))).await.unwrap();
    assert_eq!(text(res).await, "page");
    assert_eq!(
        probe.calls.load(Ordering::SeqCst),
        3,
        "the next request started afresh"
    );
}

/// A caller that leaves before its future was ever polled does not cancel the call for a caller
/// who joined; and the joined caller does not hang.
#[tokio::test(start_paused = true)]
async fn a_leader_dropped_before_its_first_poll_does_not_strand_the_others() {
    let probe = Probe::default();
    let svc = CoalesceLayer::new().layer(probe.service(ms(100), "page"));
    let mut s1 = svc.clone();
    let lead = s1.ready().await.unwrap().call(get(&url("/x")));
    let mut s2 = svc.clone();
    let follower = s2.ready().await.unwrap().call(get(&url("/x")));
    drop(lead);
    let res = tokio::time::timeout(secs(60), follower)
        .await
        .expect("the joined caller hung")
        .unwrap();
    assert_eq!(text(res).await, "page");
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
}

/// "Errors are shared too: ... each caller gets a `sturdy_core::Error` whose kind and delivery
/// are the shared error's ..., with the message "the call shared by identical requests in flight
/// failed: <the error>", and whose source chain holds a `SharedError` and then the shared error
/// itself".
#[tokio::test(start_paused = true)]
async fn errors_are_shared_with_the_documented_message_and_chain() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(ms(20)).await;
            Err::<Response<Body>, BoxError>(Box::new(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset by the peer",
            )))
        }
    });
    let svc = CoalesceLayer::new().layer(inner);
    let original: BoxError = Box::new(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "reset by the peer",
    ));
    let want_kind = sturdy::core::classify::classify_error(&*original);
    let want_delivery = delivery(&*original);
    let mut tasks = Vec::new();
    for _ in 0..5 {
        tasks.push(tokio::spawn(svc.clone().oneshot(get(&url("/e")))));
    }
    for t in tasks {
        let err = bounded(t).await.unwrap().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the call shared by identical requests in flight failed: reset by the peer"
        );
        let e = sturdy_error(&err);
        assert_eq!(e.kind(), &want_kind);
        assert_eq!(delivery(&*err), want_delivery);
        assert!(sturdy::core::find::<SharedError>(&*err).is_some());
        assert_eq!(
            sturdy::core::find::<std::io::Error>(&*err).unwrap().kind(),
            std::io::ErrorKind::ConnectionReset
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

type Chunks = http_body_util::StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, BoxError>>>,
>;

fn chunked(parts: &[&'static str]) -> Chunks {
    let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = parts
        .iter()
        .map(|p| Ok(http_body::Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    http_body_util::StreamBody::new(futures_util::stream::iter(frames))
}

/// "Above the bound: a response whose body is larger than the bound (by its size hint, or once
/// more than the bound has arrived) is not shared. The caller that started the call gets it,
/// streamed: what was read, then the rest. Every other caller sends its own request".
#[tokio::test(start_paused = true)]
async fn a_body_over_the_bound_goes_to_the_leader_and_the_others_send_their_own() {
    for hinted in [true, false] {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let inner = tower::service_fn(move |_req: Request<Body>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(ms(20)).await;
                let body = if hinted {
                    http_body_util::Either::Left(Full::new(Bytes::from(format!("0123456789-{n}"))))
                } else {
                    http_body_util::Either::Right(chunked(&["012", "345", "678", "9-", "x"]))
                };
                Ok::<_, BoxError>(Response::new(body))
            }
        });
        let (layer, handle) = CoalesceLayer::new().with_max_body(4).pair();
        let svc = layer.layer(inner);
        let mut s1 = svc.clone();
        let lead = s1.ready().await.unwrap().call(get(&url("/big")));
        let mut s2 = svc.clone();
        let other = s2.ready().await.unwrap().call(get(&url("/big")));
        let (a, b) = bounded(async { tokio::join!(lead, other) }).await;
        let (a, b) = (
            bounded(text(a.unwrap())).await,
            bounded(text(b.unwrap())).await,
        );
        if hinted {
            assert_eq!(a, "0123456789-0", "hinted");
            assert_eq!(
                b, "0123456789-1",
                "hinted: the other caller sent its own request"
            );
        } else {
            assert_eq!(a, "0123456789-x", "streamed: what was read, then the rest");
            assert_eq!(b, "0123456789-x");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "hinted={hinted}");
        let s = handle.stats();
        assert_eq!(
            (s.too_large(), s.fallbacks()),
            (1, 1),
            "hinted={hinted}: {s:?}"
        );
        assert_eq!(handle.in_flight(HOST), 0);
    }
}

/// "If the caller that started the call has gone, the first other caller to look gets the
/// response instead."
#[tokio::test(start_paused = true)]
async fn a_body_over_the_bound_goes_to_another_caller_when_the_leader_has_gone() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(20)).await;
            Ok::<_, BoxError>(Response::new(Body::from(format!("0123456789-{n}"))))
        }
    });
    let svc = CoalesceLayer::new().with_max_body(4).layer(inner);
    let mut lead = Box::pin(svc.clone().oneshot(get(&url("/big"))));
    assert!(lead.as_mut().now_or_never().is_none());
    let other = tokio::spawn(svc.clone().oneshot(get(&url("/big"))));
    tokio::task::yield_now().await;
    drop(lead);
    let res = bounded(other).await.unwrap().unwrap();
    assert_eq!(text(res).await, "0123456789-0");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "nobody sent a second request"
    );
}

/// "A request that joins a call drops that ready service at once, which gives back what it
/// reserved (a `ConcurrencyLimit` permit ...)": under `ConcurrencyLimit(2)`, a leader in flight
/// and a caller who joined it leave one permit free for a third, kept service.
#[tokio::test(start_paused = true)]
async fn a_joined_request_gives_its_concurrency_permit_back_at_once() {
    let probe = Probe::default();
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new())
        .concurrency_limit(2)
        .service(probe.service(secs(10), "slow"));
    let mut a = svc.clone();
    let lead = tokio::spawn(a.ready().await.unwrap().call(get(&url("/slow"))));
    tokio::task::yield_now().await;
    let mut b = svc.clone();
    b.ready().now_or_never().expect("a permit is free").unwrap();
    let joined = tokio::spawn(b.call(get(&url("/slow"))));
    tokio::task::yield_now().await;
    let mut c = svc.clone();
    assert!(
        c.ready().now_or_never().is_some(),
        "the joined request still holds its permit: a third caller cannot get ready"
    );
    let other = c.call(get(&url("/other")));
    let (r1, r2, r3) = bounded(async { tokio::join!(lead, joined, other) }).await;
    assert_eq!(text(r1.unwrap().unwrap()).await, "slow");
    assert_eq!(text(r2.unwrap().unwrap()).await, "slow");
    assert_eq!(text(r3.unwrap()).await, "slow");
    assert_eq!(probe.calls.load(Ordering::SeqCst), 2);
}

/// Readiness under tower's `Buffer` (both ways round) and `ConcurrencyLimit(1)`, driven by kept
/// services (`ready().await?.call(req)`): every caller gets the answer, nothing hangs, and a
/// burst through `Buffer` over coalescing is one upstream call.
#[tokio::test(start_paused = true)]
async fn kept_services_under_buffer_and_concurrency_limit_one() {
    async fn burst<S>(svc: S, n: usize) -> Vec<Bytes>
    where
        S: Service<Request<Body>, Error = BoxError> + Clone + Send + 'static,
        S::Response: Send,
        S::Future: Send,
        S::Response: Into<Response<ResponseBody<Body>>>,
    {
        let mut tasks = Vec::new();
        for _ in 0..n {
            let mut s = svc.clone();
            tasks.push(tokio::spawn(async move {
                let res: Response<ResponseBody<Body>> =
                    s.ready().await?.call(get(&url("/k"))).await?.into();
                Ok::<_, BoxError>(text(res).await)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(bounded(t).await.unwrap().unwrap());
        }
        out
    }

    // Buffer above coalescing: one upstream call for the burst.
    let probe = Probe::default();
    let svc = ServiceBuilder::new()
        .buffer(1)
        .layer(CoalesceLayer::new())
        .service(probe.service(ms(100), "k"));
    let out = burst(svc, 10).await;
    assert!(out.iter().all(|b| b == "k"));
    assert_eq!(
        probe.calls.load(Ordering::SeqCst),
        1,
        "Buffer over Coalesce"
    );

    // Coalescing above a Buffer of one slot: joined callers give their slot back.
    let probe = Probe::default();
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new())
        .buffer(1)
        .service(probe.service(ms(100), "k"));
    let out = burst(svc.clone(), 10).await;
    assert!(out.iter().all(|b| b == "k"));
    assert_eq!(
        probe.calls.load(Ordering::SeqCst),
        1,
        "Coalesce over Buffer(1)"
    );
    let res = bounded(svc.oneshot(get(&url("/after")))).await.unwrap();
    assert_eq!(text(res).await, "k");

    // Coalescing above ConcurrencyLimit(1): the others wait in poll_ready, then get an answer.
    let probe = Probe::default();
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new())
        .concurrency_limit(1)
        .service(probe.service(ms(100), "k"));
    let out = burst(svc, 5).await;
    assert!(out.iter().all(|b| b == "k"));
    assert!(probe.calls.load(Ordering::SeqCst) <= 5);
}

/// `ClientBuilder::with_coalesce`: "the coalescing layer goes around the whole stack", so
/// "identical calls share one whole outcome, retries included"; POSTs are never coalesced.
#[tokio::test(start_paused = true)]
async fn client_builder_with_coalesce_shares_the_retried_outcome() {
    let api = Api::new(|n, req| {
        if req.method() == http::Method::POST {
            st(201)
        } else if n == 0 {
            Act::Late(ms(20), 503, vec![])
        } else {
            Act::After(ms(20), 200)
        }
    });
    let (layer, handle) = CoalesceLayer::new().pair();
    let client = ClientBuilder::new()
        .with_coalesce(layer)
        .build(api.service());
    fn assert_traits<T: Send + Sync + Clone + 'static>(_: &T) {}
    assert_traits(&client);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(tokio::spawn(client.clone().oneshot(get(&url("/orders")))));
    }
    for t in tasks {
        let res = bounded(t).await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(
        api.calls(),
        2,
        "one failed attempt and one retry, for all 20 callers"
    );
    assert_eq!(handle.stats().upstream(), 1);
    assert_eq!(handle.stats().joined(), 19);

    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(tokio::spawn(client.clone().oneshot(post(&url("/orders")))));
    }
    for t in tasks {
        assert_eq!(bounded(t).await.unwrap().unwrap().status(), 201);
    }
    assert_eq!(api.calls(), 5, "POSTs pass through");
}

/// A caller who joined a call whose inner *future* hangs can still leave (a timeout above it),
/// and the one who started it keeps waiting; the flag set by a leaving caller is not shared.
#[tokio::test(start_paused = true)]
async fn a_timeout_above_one_caller_leaves_the_others_waiting() {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        let d = d.clone();
        async move {
            tokio::time::sleep(secs(5)).await;
            d.store(true, Ordering::SeqCst);
            Ok::<_, BoxError>(Response::new(Body::from("late")))
        }
    });
    let svc = CoalesceLayer::new().layer(inner);
    let lead = tokio::spawn(svc.clone().oneshot(get(&url("/t"))));
    tokio::task::yield_now().await;
    let short = tokio::time::timeout(secs(1), svc.clone().oneshot(get(&url("/t")))).await;
    assert!(short.is_err(), "the caller with a 1 s timeout left");
    let res = bounded(lead).await.unwrap().unwrap();
    assert_eq!(text(res).await, "late");
    assert!(done.load(Ordering::SeqCst));
}
