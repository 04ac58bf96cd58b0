#![cfg(feature = "full")]
//! s59: an outside round on `sturdy::coalesce::CoalesceLayer`, from its docs only: cancellation
//! of the leader and of followers before the head and while the body streams (the upstream call
//! goes on while one caller waits, and is dropped when the last leaves); bodies above
//! `with_max_body` (by size hint and by bytes, leader present or gone); a body that never ends
//! (the 30 s body timeout, not restarted by later frames); a body that fails mid-way; shared
//! errors (kind, delivery, `SharedError`, the cause); a panic below; 10,000 identical callers;
//! what makes two requests identical (ignored ids, credentials, order of values, 64 KiB
//! headers compared in full, `with_key_headers`, `with_ignored_headers`); what is not coalesced;
//! extensions and trailers shared; counters, `in_flight` and events; setters after a clone;
//! `Buffer` and `ConcurrencyLimit(1)` with a kept service; `ClientBuilder::with_coalesce` with
//! retries (one shared retry, the `CallReport` on every caller's error). Paused time throughout.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use sturdy::coalesce::{CoalesceLayer, ResponseBody, SharedError};
use sturdy::core::classify::delivery;
use sturdy::core::events::Event;
use sturdy::core::{BoxError, CallOptions, Delivery, ErrorKind};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tower::{service_fn, Layer, Service, ServiceExt};

type Req = Request<Full<Bytes>>;
type FrameResult = Result<Frame<Bytes>, BoxError>;
type Frames = mpsc::UnboundedSender<FrameResult>;
type Res = Response<ChanBody>;
type Out = Result<Response<ResponseBody<ChanBody>>, BoxError>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn get(uri: &str) -> Req {
    Request::get(uri).body(Full::default()).unwrap()
}

/// A response body fed by the test, frame by frame; ends when its sender is dropped.
struct ChanBody {
    rx: mpsc::UnboundedReceiver<FrameResult>,
    hint: Option<u64>,
}

impl HttpBody for ChanBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameResult>> {
        self.get_mut().rx.poll_recv(cx)
    }
    fn size_hint(&self) -> SizeHint {
        match self.hint {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

fn chan(hint: Option<u64>) -> (Frames, ChanBody) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, ChanBody { rx, hint })
}

fn whole(data: &[u8]) -> ChanBody {
    let (tx, body) = chan(None);
    tx.send(Ok(Frame::data(Bytes::copy_from_slice(data))))
        .unwrap();
    body
}

fn data(tx: &Frames, b: &[u8]) {
    tx.send(Ok(Frame::data(Bytes::copy_from_slice(b)))).unwrap();
}

/// One upstream call the test answers by hand.
struct Call {
    req: Req,
    reply: oneshot::Sender<Result<Res, BoxError>>,
}

impl Call {
    fn answer(self, body: ChanBody) {
        let _ = self.reply.send(Ok(Response::new(body)));
    }
}

#[derive(Clone)]
struct Up {
    tx: mpsc::UnboundedSender<Call>,
    n: Arc<AtomicUsize>,
}

fn up() -> (Up, mpsc::UnboundedReceiver<Call>, Arc<AtomicUsize>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let n = Arc::new(AtomicUsize::new(0));
    (Up { tx, n: n.clone() }, rx, n)
}

impl Service<Req> for Up {
    type Response = Res;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Res, BoxError>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Req) -> Self::Future {
        self.n.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Call { req, reply: tx });
        Box::pin(async move {
            rx.await
                .map_err(|_| BoxError::from("reply dropped by the test"))?
        })
    }
}

type Svc = sturdy::coalesce::Coalesce<Up, sturdy::core::ByHost>;

fn go(svc: &Svc, req: Req) -> JoinHandle<Out> {
    tokio::spawn(svc.clone().oneshot(req))
}

/// Lets every spawned task run (paused time: nothing else is due within 1 ms).
async fn settle() {
    tokio::time::sleep(ms(1)).await;
}

async fn text<B>(res: Response<B>) -> Bytes
where
    B: HttpBody<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    res.into_body().collect().await.unwrap().to_bytes()
}

fn chain(err: &BoxError) -> String {
    let mut s = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
    while let Some(e) = cur {
        s.push_str(&e.to_string());
        s.push_str(" | ");
        cur = e.source();
    }
    s
}

fn top(err: &BoxError) -> &sturdy::core::Error {
    err.downcast_ref::<sturdy::core::Error>()
        .unwrap_or_else(|| panic!("top-level error is not sturdy_core::Error: {err:?}"))
}

// ---------------------------------------------------------------------------------------------
// Cancellation.

#[tokio::test(start_paused = true)]
async fn s59_leader_dropped_before_head_follower_still_served() {
    let (api, mut calls, n) = up();
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api);
    let leader = go(&svc, get("http://a.test/x"));
    settle().await;
    let follower = go(&svc, get("http://a.test/x"));
    settle().await;
    let call = calls.recv().await.unwrap();
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(handle.stats().joined(), 1);
    leader.abort();
    settle().await;
    assert!(
        !call.reply.is_closed(),
        "the shared call was cancelled though a follower waits"
    );
    call.answer(whole(b"shared"));
    let res = follower.await.unwrap().unwrap();
    assert_eq!(text(res).await, "shared");
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(handle.in_flight("a.test"), 0);
}

#[tokio::test(start_paused = true)]
async fn s59_follower_dropped_before_head_leader_still_served() {
    let (api, mut calls, _n) = up();
    let svc = CoalesceLayer::new().layer(api);
    let leader = go(&svc, get("http://a.test/x"));
    settle().await;
    let follower = go(&svc, get("http://a.test/x"));
    settle().await;
    follower.abort();
    settle().await;
    let call = calls.recv().await.unwrap();
    assert!(!call.reply.is_closed());
    call.answer(whole(b"ok"));
    assert_eq!(text(leader.await.unwrap().unwrap()).await, "ok");
}

#[tokio::test(start_paused = true)]
async fn s59_last_caller_gone_before_head_cancels_upstream_and_next_starts_afresh() {
    let (api, mut calls, n) = up();
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api);
    let a = go(&svc, get("http://a.test/x"));
    settle().await;
    let b = go(&svc, get("http://a.test/x"));
    settle().await;
    let mut call = calls.recv().await.unwrap();
    assert_eq!(handle.in_flight("A.TEST"), 1);
    a.abort();
    b.abort();
    tokio::time::timeout(Duration::from_secs(5), call.reply.closed())
        .await
        .expect("the upstream call was not dropped when the last caller left");
    assert_eq!(handle.in_flight("a.test"), 0);
    let c = go(&svc, get("http://a.test/x"));
    settle().await;
    let call = calls.recv().await.unwrap();
    call.answer(whole(b"fresh"));
    assert_eq!(text(c.await.unwrap().unwrap()).await, "fresh");
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn s59_leader_dropped_mid_body_follower_gets_whole_body() {
    let (api, mut calls, n) = up();
    let svc = CoalesceLayer::new().layer(api);
    let leader = go(&svc, get("http://a.test/x"));
    settle().await;
    let follower = go(&svc, get("http://a.test/x"));
    settle().await;
    let (tx, body) = chan(None);
    calls.recv().await.unwrap().answer(body);
    data(&tx, b"first ");
    settle().await;
    leader.abort();
    settle().await;
    assert!(
        !tx.is_closed(),
        "the body read stopped though a follower waits"
    );
    data(&tx, b"second");
    drop(tx);
    assert_eq!(text(follower.await.unwrap().unwrap()).await, "first second");
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn s59_all_dropped_mid_body_cancels_body_read() {
    let (api, mut calls, _n) = up();
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api);
    let leader = go(&svc, get("http://a.test/x"));
    settle().await;
    let follower = go(&svc, get("http://a.test/x"));
    settle().await;
    let (tx, body) = chan(None);
    calls.recv().await.unwrap().answer(body);
    data(&tx, b"part");
    settle().await;
    follower.abort();
    settle().await;
    assert!(!tx.is_closed());
    leader.abort();
    tokio::time::timeout(Duration::from_secs(5), tx.closed())
        .await
        .expect("the body was still read with nobody waiting");
    assert_eq!(handle.in_flight("a.test"), 0);
}

#[tokio::test(start_paused = true)]
async fn s59_poll_level_follower_dropped_between_polls() {
    // Poll-level: three callers polled by hand, the middle one dropped after the head.
    let (api, mut calls, n) = up();
    let svc = CoalesceLayer::new().layer(api);
    let mut a = tokio_test::task::spawn(svc.clone().oneshot(get("http://a.test/x")));
    let mut b = tokio_test::task::spawn(svc.clone().oneshot(get("http://a.test/x")));
    let mut c = tokio_test::task::spawn(svc.clone().oneshot(get("http://a.test/x")));
    tokio_test::assert_pending!(a.poll());
    tokio_test::assert_pending!(b.poll());
    tokio_test::assert_pending!(c.poll());
    let call = calls
        .try_recv()
        .expect("the leader's call reached the service");
    let (tx, body) = chan(None);
    call.answer(body);
    tokio_test::assert_pending!(b.poll());
    drop(b);
    data(&tx, b"abc");
    drop(tx);
    // Whoever polls drives the shared call.
    let res = loop {
        if let Poll::Ready(r) = c.poll() {
            break r;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(text(res.unwrap()).await, "abc");
    let res = tokio_test::assert_ready!(a.poll());
    assert_eq!(text(res.unwrap()).await, "abc");
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Bodies above the bound, bodies that never end or fail.

#[tokio::test(start_paused = true)]
async fn s59_body_over_limit_leader_streams_follower_sends_own() {
    let (api, mut calls, n) = up();
    let (layer, handle) = CoalesceLayer::new().with_max_body(10).pair();
    let svc = layer.layer(api);
    let leader = go(&svc, get("http://a.test/big"));
    settle().await;
    let follower = go(&svc, get("http://a.test/big"));
    settle().await;
    let (tx, body) = chan(None);
    calls.recv().await.unwrap().answer(body);
    data(&tx, b"012345");
    settle().await;
    data(&tx, b"6789ab");
    settle().await;
    // The follower sends a request of its own.
    let own = tokio::time::timeout(Duration::from_secs(5), calls.recv())
        .await
        .expect("the follower did not send its own request")
        .unwrap();
    assert_eq!(own.req.uri(), "http://a.test/big");
    own.answer(whole(b"own"));
    data(&tx, b"cdef");
    drop(tx);
    let lres = leader.await.unwrap().unwrap();
    assert!(!lres.body().is_shared());
    assert_eq!(text(lres).await, "0123456789abcdef");
    assert_eq!(text(follower.await.unwrap().unwrap()).await, "own");
    assert_eq!(n.load(Ordering::SeqCst), 2);
    let s = handle.stats();
    assert_eq!((s.too_large(), s.fallbacks()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn s59_body_over_limit_by_size_hint() {
    let (api, mut calls, n) = up();
    let (layer, handle) = CoalesceLayer::new().with_max_body(10).pair();
    let svc = layer.layer(api);
    let leader = go(&svc, get("http://a.test/big"));
    settle().await;
    let follower = go(&svc, get("http://a.test/big"));
    settle().await;
    let (tx, body) = chan(Some(11));
    calls.recv().await.unwrap().answer(body);
    settle().await;
    let own = tokio::time::timeout(Duration::from_secs(5), calls.recv())
        .await
        .expect("the follower did not send its own request")
        .unwrap();
    own.answer(whole(b"own"));
    data(&tx, b"0123456789a");
    drop(tx);
    assert_eq!(text(leader.await.unwrap().unwrap()).await, "0123456789a");
    assert_eq!(text(follower.await.unwrap().unwrap()).await, "own");
    assert_eq!(n.load(Ordering::SeqCst), 2);
    assert_eq!(handle.stats().too_large(), 1);
}

#[tokio::test(start_paused = true)]
async fn s59_body_exactly_at_limit_is_shared() {
    let (api, mut calls, n) = up();
    let (layer, handle) = CoalesceLayer::new().with_max_body(10).pair();
    let svc = layer.layer(api);
    let a = go(&svc, get("http://a.test/x"));
    settle().await;
    let b = go(&svc, get("http://a.test/x"));
    settle().await;
    calls.recv().await.unwrap().answer(whole(b"0123456789"));
    let ra = a.await.unwrap().unwrap();
    let rb = b.await.unwrap().unwrap();
    assert!(ra.body().is_shared() && rb.body().is_shared());
    assert_eq!(text(ra).await, "0123456789");
    assert_eq!(text(rb).await, "0123456789");
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(handle.stats().too_large(), 0);
}

#[tokio::test(start_paused = true)]
async fn s59_body_over_limit_leader_gone_follower_takes_it() {
    let (api, mut calls, n) = up();
    let svc = CoalesceLayer::new().with_max_body(10).layer(api);
    let leader = go(&svc, get("http://a.test/big"));
    settle().await;
    let follower = go(&svc, get("http://a.test/big"));
    settle().await;
    let (tx, body) = chan(None);
    calls.recv().await.unwrap().answer(body);
    data(&tx, b"012345");
    settle().await;
    leader.abort();
    settle().await;
    data(&tx, b"6789ab");
    data(&tx, b"cd");
    drop(tx);
    let res = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("the follower hung")
        .unwrap()
        .unwrap();
    assert_eq!(text(res).await, "0123456789abcd");
    assert_eq!(
        n.load(Ordering::SeqCst),
        1,
        "the follower sent its own though it took the response"
    );
}

#[tokio::test(start_paused = true)]
async fn s59_body_never_ends_times_out_30s_after_head() {
    let (api, mut calls, n) = up();
    let svc = CoalesceLayer::new().layer(api);
    let a = go(&svc, get("http://a.test/slow"));
    settle().await;
    let b = go(&svc, get("http://a.test/slow"));
    settle().await;
    let (tx, body) = chan(None);
    let head = tokio::time::Instant::now();
    calls.recv().await.unwrap().answer(body);
    // Later frames do not restart the timer.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(9)).await;
        data(&tx, b"drip");
    }
    for h in [a, b] {
        let err = h.await.unwrap().unwrap_err();
        let waited = head.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
            "{waited:?}"
        );
        assert_eq!(top(&err).kind(), &ErrorKind::Timeout, "{err}");
        assert!(
            chain(&err)
                .contains("the shared response's body did not arrive within 30s of its head"),
            "{}",
            chain(&err)
        );
        // The head arrived: the request was sent.
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    }
    assert_eq!(n.load(Ordering::SeqCst), 1);
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn s59_body_timeout_setting_and_without() {
    let (api, mut calls, _n) = up();
    let svc = CoalesceLayer::new()
        .with_body_timeout(Duration::from_secs(5))
        .layer(api);
    let a = go(&svc, get("http://a.test/slow"));
    settle().await;
    let (tx, body) = chan(None);
    let head = tokio::time::Instant::now();
    calls.recv().await.unwrap().answer(body);
    let err = a.await.unwrap().unwrap_err();
    assert!(head.elapsed() < Duration::from_secs(6));
    assert!(
        chain(&err).contains("within 5s of its head"),
        "{}",
        chain(&err)
    );
    drop(tx);

    let (api, mut calls, _n) = up();
    let svc = CoalesceLayer::new().without_body_timeout().layer(api);
    let a = go(&svc, get("http://a.test/slow"));
    settle().await;
    let (tx, body) = chan(None);
    calls.recv().await.unwrap().answer(body);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!a.is_finished());
    data(&tx, b"late");
    drop(tx);
    assert_eq!(text(a.await.unwrap().unwrap()).await, "late");
}

#[tokio::test(start_paused = true)]
async fn s59_body_fails_mid_way_every_caller_gets_body_error() {
    let (api, mut calls, n) = up();
    let svc = CoalesceLayer::new().layer(api);
    let callers: Vec<_> = (0..5).map(|_| go(&svc, get("http://a.test/x"))).collect();
    settle().await;
    let (tx, body) = chan(None);
    calls.recv().await.unwrap().answer(body);
    data(&tx, b"half");
    tx.send(Err(BoxError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "reset mid-body",
    ))))
    .unwrap();
    for h in callers {
        let err = h.await.unwrap().unwrap_err();
        assert_eq!(top(&err).kind(), &ErrorKind::Body, "{}", chain(&err));
        assert!(
            top(&err)
                .to_string()
                .starts_with("the call shared by identical requests in flight failed: "),
            "{err}"
        );
        assert!(sturdy::core::find::<SharedError>(&*err).is_some());
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    }
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Shared errors and panics.

#[tokio::test(start_paused = true)]
async fn s59_shared_errors_keep_kind_delivery_and_cause() {
    for (io_kind, kind, deliv) in [
        (
            std::io::ErrorKind::ConnectionRefused,
            ErrorKind::Connect,
            Delivery::NotSent,
        ),
        (
            std::io::ErrorKind::ConnectionReset,
            ErrorKind::Transport,
            Delivery::MaybeProcessed,
        ),
    ] {
        let (api, mut calls, n) = up();
        let svc = CoalesceLayer::new().layer(api);
        let callers: Vec<_> = (0..20).map(|_| go(&svc, get("http://a.test/x"))).collect();
        settle().await;
        let call = calls.recv().await.unwrap();
        let _ = call
            .reply
            .send(Err(std::io::Error::new(io_kind, "boom").into()));
        for h in callers {
            let err = h.await.unwrap().unwrap_err();
            let e = top(&err);
            assert_eq!(e.kind(), &kind, "{}", chain(&err));
            assert_eq!(delivery(&*err), deliv, "{}", chain(&err));
            assert!(sturdy::core::find::<SharedError>(&*err).is_some());
            assert_eq!(
                sturdy::core::find::<std::io::Error>(&*err).unwrap().kind(),
                io_kind
            );
        }
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn s59_panic_below_reaches_every_caller_then_fresh_call() {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let api = service_fn(move |_req: Req| {
        let k = c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(10)).await;
            if k == 0 {
                panic!("boom below");
            }
            Ok::<_, BoxError>(Response::new(whole(b"after")))
        }
    });
    let svc = CoalesceLayer::new().layer(api);
    let callers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://a.test/x"))))
        .collect();
    for h in callers {
        let err = h
            .await
            .expect("the panic escaped into a caller's task")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("a layer or service below panicked while running it: boom below"),
            "{}",
            chain(&err)
        );
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    }
    let res = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    assert_eq!(text(res).await, "after");
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------------
// Many callers; what is identical; what passes through.

#[tokio::test(start_paused = true)]
async fn s59_ten_thousand_followers_one_call() {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let api = service_fn(move |_req: Req| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(ms(50)).await;
            let mut res = Response::new(whole(b"the report"));
            res.headers_mut()
                .insert("x-v", HeaderValue::from_static("1"));
            Ok::<_, BoxError>(res)
        }
    });
    let events = Arc::new(AtomicUsize::new(0));
    let e = events.clone();
    let (layer, handle) = CoalesceLayer::new()
        .on_event(move |ev| {
            if matches!(ev, Event::Coalesced { .. }) {
                e.fetch_add(1, Ordering::SeqCst);
            }
        })
        .pair();
    let svc = layer.layer(api);
    let callers: Vec<_> = (0..10_000)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://api.example.com/report"))))
        .collect();
    for h in callers {
        let res = h.await.unwrap().unwrap();
        assert_eq!(res.headers()["x-v"], "1");
        assert_eq!(text(res).await, "the report");
    }
    assert_eq!(n.load(Ordering::SeqCst), 1);
    let s = handle.stats();
    assert_eq!((s.calls(), s.upstream(), s.joined()), (10_000, 1, 9_999));
    assert_eq!(events.load(Ordering::SeqCst), 9_999);
    assert_eq!(handle.in_flight("api.example.com"), 0);
}

/// How many upstream calls two requests made when sent together.
async fn calls_for(layer: CoalesceLayer, a: Req, b: Req) -> usize {
    let (api, mut calls, n) = up();
    let svc = layer.layer(api);
    let ha = go(&svc, a);
    settle().await;
    let hb = go(&svc, b);
    settle().await;
    let made = n.load(Ordering::SeqCst);
    while let Ok(call) = calls.try_recv() {
        call.answer(whole(b"x"));
    }
    ha.await.unwrap().unwrap();
    hb.await.unwrap().unwrap();
    made
}

fn with(uri: &str, headers: &[(&str, &str)]) -> Req {
    let mut req = get(uri);
    for (k, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    req
}

#[tokio::test(start_paused = true)]
async fn s59_identity_of_requests_by_default() {
    let u = "http://a.test/x?q=1";
    let l = CoalesceLayer::new;
    // Per-request ids do not count.
    for id in [
        "traceparent",
        "tracestate",
        "baggage",
        "x-request-id",
        "x-correlation-id",
    ] {
        assert_eq!(
            calls_for(l(), with(u, &[(id, "1")]), with(u, &[(id, "2")])).await,
            1,
            "{id}"
        );
        assert_eq!(
            calls_for(l(), with(u, &[(id, "1")]), get(u)).await,
            1,
            "{id}"
        );
    }
    // Credentials, Accept, Range, conditionals, API keys do.
    for h in [
        "authorization",
        "cookie",
        "x-api-key",
        "accept",
        "range",
        "if-none-match",
    ] {
        assert_eq!(
            calls_for(l(), with(u, &[(h, "1")]), with(u, &[(h, "2")])).await,
            2,
            "{h}"
        );
        assert_eq!(calls_for(l(), with(u, &[(h, "1")]), get(u)).await, 2, "{h}");
    }
    // Order across names does not count; order of one name's values does.
    assert_eq!(
        calls_for(
            l(),
            with(u, &[("accept", "a"), ("authorization", "b")]),
            with(u, &[("authorization", "b"), ("accept", "a")])
        )
        .await,
        1
    );
    assert_eq!(
        calls_for(
            l(),
            with(u, &[("accept", "a"), ("accept", "b")]),
            with(u, &[("accept", "b"), ("accept", "a")])
        )
        .await,
        2
    );
    // A value split over two lines is not the same as one line.
    assert_eq!(
        calls_for(
            l(),
            with(u, &[("accept", "a"), ("accept", "b")]),
            with(u, &[("accept", "a")])
        )
        .await,
        2
    );
    // Method, path, query and scheme count.
    assert_eq!(calls_for(l(), get(u), get("http://a.test/x?q=2")).await, 2);
    assert_eq!(calls_for(l(), get(u), get("http://a.test/y?q=1")).await, 2);
    assert_eq!(calls_for(l(), get(u), get("https://a.test/x?q=1")).await, 2);
    assert_eq!(
        calls_for(l(), get(u), get("http://a.test:8080/x?q=1")).await,
        2
    );
    let head = || Request::head(u).body(Full::default()).unwrap();
    assert_eq!(calls_for(l(), get(u), head()).await, 2);
    assert_eq!(calls_for(l(), head(), head()).await, 1);
    // Delimiter games: a header name/value pair must not collide with another split.
    assert_eq!(
        calls_for(
            l(),
            with(u, &[("x-a", "b:c")]),
            with(u, &[("x-a", "b"), ("c", "")])
        )
        .await,
        2
    );
    assert_eq!(
        calls_for(l(), get("http://a.test/x?"), get("http://a.test/x")).await,
        2
    );
}

#[tokio::test(start_paused = true)]
async fn s59_huge_headers_compared_in_full() {
    let big = "v".repeat(64 * 1024);
    let mut other = big.clone();
    other.pop();
    other.push('w');
    let u = "http://a.test/x";
    assert_eq!(
        calls_for(
            CoalesceLayer::new(),
            with(u, &[("x-big", &big)]),
            with(u, &[("x-big", &big)])
        )
        .await,
        1
    );
    assert_eq!(
        calls_for(
            CoalesceLayer::new(),
            with(u, &[("x-big", &big)]),
            with(u, &[("x-big", &other)])
        )
        .await,
        2
    );
    // Hundreds of headers.
    let many: Vec<(String, String)> = (0..500)
        .map(|i| (format!("x-h{i}"), format!("{i}")))
        .collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let mut last = refs.clone();
    last[499].1 = "other";
    assert_eq!(
        calls_for(CoalesceLayer::new(), with(u, &refs), with(u, &refs)).await,
        1
    );
    assert_eq!(
        calls_for(CoalesceLayer::new(), with(u, &refs), with(u, &last)).await,
        2
    );
}

#[tokio::test(start_paused = true)]
async fn s59_key_headers_and_ignored_headers() {
    use http::header::{ACCEPT, AUTHORIZATION};
    let u = "http://a.test/x";
    let keyed = || CoalesceLayer::new().with_key_headers([AUTHORIZATION, ACCEPT]);
    assert_eq!(
        calls_for(
            keyed(),
            with(u, &[("x-other", "1")]),
            with(u, &[("x-other", "2")])
        )
        .await,
        1
    );
    assert_eq!(
        calls_for(
            keyed(),
            with(u, &[("authorization", "a")]),
            with(u, &[("authorization", "b")])
        )
        .await,
        2
    );
    assert_eq!(
        calls_for(keyed(), with(u, &[("accept", "a")]), get(u)).await,
        2
    );
    // URI and method still count with key headers.
    assert_eq!(calls_for(keyed(), get(u), get("http://a.test/y")).await, 2);
    // An empty ignored list compares every header, the request ids included.
    let all = || CoalesceLayer::new().with_ignored_headers([]);
    assert_eq!(
        calls_for(
            all(),
            with(u, &[("x-request-id", "1")]),
            with(u, &[("x-request-id", "2")])
        )
        .await,
        2
    );
    // A replaced list: only the names given are ignored.
    let ign =
        || CoalesceLayer::new().with_ignored_headers([http::HeaderName::from_static("x-noise")]);
    assert_eq!(
        calls_for(
            ign(),
            with(u, &[("x-noise", "1")]),
            with(u, &[("x-noise", "2")])
        )
        .await,
        1
    );
    assert_eq!(
        calls_for(
            ign(),
            with(u, &[("traceparent", "1")]),
            with(u, &[("traceparent", "2")])
        )
        .await,
        2
    );
}

#[tokio::test(start_paused = true)]
async fn s59_what_passes_through() {
    let u = "http://a.test/x";
    let post = || Request::post(u).body(Full::default()).unwrap();
    let put = || Request::put(u).body(Full::default()).unwrap();
    let get_body = || Request::get(u).body(Full::new(Bytes::from("q"))).unwrap();
    let get_opts = || {
        let mut r = get(u);
        r.extensions_mut()
            .insert(CallOptions::new().with_deadline(Duration::from_secs(5)));
        r
    };
    let get_noretry = || {
        let mut r = get(u);
        r.extensions_mut()
            .insert(CallOptions::new().without_retries());
        r
    };
    let (layer, handle) = CoalesceLayer::new().pair();
    assert_eq!(calls_for(layer.clone(), post(), post()).await, 2);
    assert_eq!(calls_for(layer.clone(), put(), put()).await, 2);
    assert_eq!(calls_for(layer.clone(), get_body(), get_body()).await, 2);
    assert_eq!(
        handle.stats().calls(),
        0,
        "non-coalescable requests were counted as calls"
    );
    assert_eq!(calls_for(layer.clone(), get_opts(), get_opts()).await, 2);
    assert_eq!(
        calls_for(layer.clone(), get_noretry(), get_noretry()).await,
        2
    );
    // A request with options does not join a plain one either way.
    assert_eq!(calls_for(layer.clone(), get(u), get_opts()).await, 2);
    assert_eq!(calls_for(layer.clone(), get_opts(), get(u)).await, 2);
    // Only the two plain GETs started shared calls.
    assert_eq!(handle.stats().upstream(), 2);
}

#[tokio::test(start_paused = true)]
async fn s59_not_a_cache_and_in_flight_counts() {
    let (api, mut calls, n) = up();
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api);
    let a = go(&svc, get("http://API.a.test/x"));
    settle().await;
    assert_eq!(handle.in_flight("api.a.test"), 1);
    assert_eq!(handle.in_flight("Api.A.Test"), 1);
    let (tx, body) = chan(None);
    calls.recv().await.unwrap().answer(body);
    data(&tx, b"one");
    settle().await;
    // Head arrived, body not yet read: still in flight.
    assert_eq!(handle.in_flight("api.a.test"), 1);
    drop(tx);
    assert_eq!(text(a.await.unwrap().unwrap()).await, "one");
    assert_eq!(handle.in_flight("api.a.test"), 0);
    let b = go(&svc, get("http://api.a.test/x"));
    settle().await;
    calls.recv().await.unwrap().answer(whole(b"two"));
    assert_eq!(text(b.await.unwrap().unwrap()).await, "two");
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn s59_extensions_headers_and_trailers_shared() {
    #[derive(Clone, Debug, PartialEq)]
    struct Tag(u32);
    let (api, mut calls, _n) = up();
    let svc = CoalesceLayer::new().layer(api);
    let callers: Vec<_> = (0..3).map(|_| go(&svc, get("http://a.test/x"))).collect();
    settle().await;
    let call = calls.recv().await.unwrap();
    let (tx, body) = chan(None);
    let mut res = Response::builder()
        .status(203)
        .header("x-h", "1")
        .body(body)
        .unwrap();
    res.extensions_mut().insert(Tag(7));
    let _ = call.reply.send(Ok(res));
    data(&tx, b"ab");
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sum", HeaderValue::from_static("99"));
    tx.send(Ok(Frame::trailers(trailers))).unwrap();
    drop(tx);
    for h in callers {
        let res = h.await.unwrap().unwrap();
        assert_eq!(res.status(), 203);
        assert_eq!(res.headers()["x-h"], "1");
        assert_eq!(res.extensions().get::<Tag>(), Some(&Tag(7)));
        let collected = res.into_body().collect().await.unwrap();
        assert_eq!(
            collected.trailers().map(|t| t["x-sum"].clone()),
            Some(HeaderValue::from_static("99"))
        );
        assert_eq!(collected.to_bytes(), "ab");
    }
}

#[tokio::test(start_paused = true)]
async fn s59_setter_after_clone_applies_to_clone() {
    // "A setter called after a clone or a handle was taken applies to all of them; services made
    // earlier keep the settings they were made with."
    let layer = CoalesceLayer::new();
    let (api, mut calls, _n) = up();
    let earlier = layer.layer(api.clone());
    let clone = layer.clone();
    let handle = layer.handle();
    let _layer = layer.with_max_body(4);
    let later = clone.layer(api);
    for (svc, too_large) in [(&earlier, 0), (&later, 1)] {
        let a = go(svc, get("http://a.test/x"));
        settle().await;
        calls.recv().await.unwrap().answer(whole(b"0123456789"));
        assert_eq!(text(a.await.unwrap().unwrap()).await, "0123456789");
        assert_eq!(handle.stats().too_large(), too_large);
    }
}

// ---------------------------------------------------------------------------------------------
// Composition.

#[tokio::test(start_paused = true)]
async fn s59_under_buffer_kept_service() {
    for bound in [1usize, 64] {
        let (api, mut calls, n) = up();
        let (layer, handle) = CoalesceLayer::new().pair();
        let mut svc = tower::buffer::Buffer::new(layer.layer(api), bound);
        let mut futs = Vec::new();
        for _ in 0..100 {
            let f = svc.ready().await.unwrap().call(get("http://a.test/x"));
            futs.push(tokio::spawn(f));
        }
        settle().await;
        calls.recv().await.unwrap().answer(whole(b"buffered"));
        for f in futs {
            assert_eq!(text(f.await.unwrap().unwrap()).await, "buffered");
        }
        assert_eq!(n.load(Ordering::SeqCst), 1, "bound {bound}");
        assert_eq!(handle.stats().joined(), 99);
    }
}

#[tokio::test(start_paused = true)]
async fn s59_over_concurrency_limit_one_kept_service_joins_while_body_read() {
    let (api, mut calls, n) = up();
    let (layer, handle) = CoalesceLayer::new().pair();
    let mut svc = layer.layer(tower::limit::ConcurrencyLimit::new(api, 1));
    let f1 = svc.ready().await.unwrap().call(get("http://a.test/x"));
    let first = tokio::spawn(f1);
    settle().await;
    let second = tokio::spawn(async move {
        let f = svc.ready().await?.call(get("http://a.test/x"));
        f.await
    });
    settle().await;
    assert_eq!(n.load(Ordering::SeqCst), 1);
    let (tx, body) = chan(None);
    calls.recv().await.unwrap().answer(body);
    data(&tx, b"part ");
    settle().await;
    // Head arrived, the permit is back, the body is still read: the second joins.
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(handle.stats().joined(), 1);
    data(&tx, b"rest");
    drop(tx);
    assert_eq!(text(first.await.unwrap().unwrap()).await, "part rest");
    assert_eq!(text(second.await.unwrap().unwrap()).await, "part rest");
}

#[tokio::test(start_paused = true)]
async fn s59_over_concurrency_limit_one_fallback_drives_clone_ready() {
    // A follower whose shared body is too large sends its own call through a clone it drives
    // to readiness: over ConcurrencyLimit(1), it must wait for the permit, not panic or hang.
    let (api, mut calls, n) = up();
    let svc = CoalesceLayer::new()
        .with_max_body(4)
        .layer(tower::limit::ConcurrencyLimit::new(api, 1));
    let leader = tokio::spawn(svc.clone().oneshot(get("http://a.test/x")));
    settle().await;
    let (tx, body) = chan(None);
    calls.recv().await.unwrap().answer(body);
    data(&tx, b"01");
    settle().await;
    let follower = tokio::spawn(svc.clone().oneshot(get("http://a.test/x")));
    settle().await;
    data(&tx, b"23456");
    drop(tx);
    let lres = leader.await.unwrap().unwrap();
    assert_eq!(text(lres).await, "0123456");
    let own = tokio::time::timeout(Duration::from_secs(5), calls.recv())
        .await
        .expect("the follower never sent its own")
        .unwrap();
    own.answer(whole(b"own"));
    assert_eq!(text(follower.await.unwrap().unwrap()).await, "own");
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn s59_client_builder_one_shared_retry() {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let http = service_fn(move |_req: Req| {
        let k = c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(20)).await;
            let status = if k == 0 { 503 } else { 200 };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from("orders")))
                    .unwrap(),
            )
        }
    });
    let (layer, handle) = CoalesceLayer::new().pair();
    let client = ClientBuilder::new().with_coalesce(layer).build(http);
    let callers: Vec<_> = (0..200)
        .map(|_| tokio::spawn(client.clone().oneshot(get("http://a.test/orders"))))
        .collect();
    for h in callers {
        let res = h.await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(text(res).await, "orders");
    }
    assert_eq!(n.load(Ordering::SeqCst), 2);
    assert_eq!(handle.stats().upstream(), 1);
}

#[tokio::test(start_paused = true)]
async fn s59_client_builder_report_on_every_caller() {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let http = service_fn(move |_req: Req| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(5)).await;
            Err::<Response<Full<Bytes>>, BoxError>(
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into(),
            )
        }
    });
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_max_attempts(3))
        .with_coalesce(CoalesceLayer::new())
        .build(http);
    let callers: Vec<_> = (0..10)
        .map(|_| tokio::spawn(client.clone().oneshot(get("http://a.test/x"))))
        .collect();
    for h in callers {
        let err = h.await.unwrap().unwrap_err();
        let e = top(&err);
        let report = e
            .report()
            .unwrap_or_else(|| panic!("no report: {}", chain(&err)));
        assert_eq!(report.attempts(), 3);
        assert_eq!(delivery(&*err), Delivery::NotSent);
        assert_eq!(e.kind(), &ErrorKind::Connect);
        assert!(sturdy::core::find::<SharedError>(&*err).is_some());
    }
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn s59_max_hosts_zero_never_mixes_hosts() {
    let (api, mut calls, n) = up();
    let (layer, handle) = CoalesceLayer::new().with_max_hosts(0).pair();
    let svc = layer.layer(api);
    let hosts = ["a.test", "b.test", "c.test", "a.test"];
    let callers: Vec<_> = hosts
        .iter()
        .map(|h| go(&svc, get(&format!("http://{h}/same"))))
        .collect();
    settle().await;
    assert_eq!(n.load(Ordering::SeqCst), 3);
    assert_eq!(handle.stats().joined(), 1);
    while let Ok(call) = calls.try_recv() {
        let host = call.req.uri().host().unwrap().to_string();
        call.answer(whole(host.as_bytes()));
    }
    for (h, c) in hosts.iter().zip(callers) {
        assert_eq!(text(c.await.unwrap().unwrap()).await, *h);
    }
}

/// A service whose `call` blocks its thread until told, then panics.
#[derive(Clone)]
struct PanicInCall {
    gate: Arc<std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>>,
    n: Arc<AtomicUsize>,
}

impl Service<Req> for PanicInCall {
    type Response = Res;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Res, BoxError>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Req) -> Self::Future {
        let k = self.n.fetch_add(1, Ordering::SeqCst);
        if k == 0 {
            let rx = self.gate.lock().unwrap().take().unwrap();
            let _ = rx.recv();
            panic!("call blew up");
        }
        Box::pin(async { Ok(Response::new(whole(b"later"))) })
    }
}

#[tokio::test]
async fn s59_panic_inside_leaders_call_followers_get_not_sent() {
    let (open, gate) = std::sync::mpsc::channel();
    let n = Arc::new(AtomicUsize::new(0));
    let api = PanicInCall {
        gate: Arc::new(std::sync::Mutex::new(Some(gate))),
        n: n.clone(),
    };
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api);
    let mut leader_svc = svc.clone();
    let leader = std::thread::spawn(move || {
        drop(leader_svc.call(get("http://a.test/x")));
    });
    // Wait until the leader is inside the inner call.
    let t0 = tokio::time::Instant::now();
    while n.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(ms(1)).await;
    }
    let followers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://a.test/x"))))
        .collect();
    while handle.stats().joined() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "followers did not join"
        );
        tokio::time::sleep(ms(1)).await;
    }
    open.send(()).unwrap();
    assert!(leader.join().is_err(), "the leader's call did not panic");
    for f in followers {
        let err = tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("a follower hung after the leader's call panicked")
            .unwrap()
            .unwrap_err();
        assert_eq!(delivery(&*err), Delivery::NotSent, "{}", chain(&err));
    }
    // The next identical request makes a call of its own.
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        svc.clone().oneshot(get("http://a.test/x")),
    )
    .await
    .expect("hung after the panic")
    .unwrap();
    assert_eq!(text(res).await, "later");
    assert_eq!(handle.in_flight("a.test"), 0);
}

#[tokio::test(start_paused = true)]
async fn s59_fallback_sends_the_followers_own_request() {
    // Joined on an ignored header (x-request-id); when the body is too large the follower sends
    // its own request, with its own id, not the leader's.
    let (api, mut calls, _n) = up();
    let svc = CoalesceLayer::new().with_max_body(2).layer(api);
    let leader = go(&svc, with("http://a.test/x", &[("x-request-id", "lead")]));
    settle().await;
    let follower = go(&svc, with("http://a.test/x", &[("x-request-id", "follow")]));
    settle().await;
    let first = calls.recv().await.unwrap();
    assert_eq!(first.req.headers()["x-request-id"], "lead");
    first.answer(whole(b"too large"));
    let own = tokio::time::timeout(Duration::from_secs(5), calls.recv())
        .await
        .expect("no fallback")
        .unwrap();
    assert_eq!(own.req.headers()["x-request-id"], "follow");
    // Dropping the follower during its own call does not disturb the leader.
    follower.abort();
    assert_eq!(text(leader.await.unwrap().unwrap()).await, "too large");
    drop(own);
}
