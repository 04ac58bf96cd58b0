//! Coalescing on paused time, against in-process services and tower-test mocks.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use sturdy_coalesce::{Coalesce, CoalesceLayer, ResponseBody, ResponseFuture, SharedError};
use sturdy_core::classify::{classify_error, delivery};
use sturdy_core::{BoxError, Delivery, ErrorKind};
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const HOST: &str = "api.example.com";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{HOST}{path}"))
        .body(Full::default())
        .unwrap()
}

/// A body of chunks with no size hint, and optional trailers.
struct Chunks(VecDeque<Bytes>, Option<HeaderMap>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(c) = self.0.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        Poll::Ready(self.1.take().map(|t| Ok(Frame::trailers(t))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::new()
    }
}

/// Counts live futures of the service.
struct Live(Arc<AtomicUsize>);
impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A service that answers after `delay` with `chunks` of body (or fails with `fail`), counting
/// calls, live futures and the requests it saw.
#[derive(Clone)]
struct Api {
    calls: Arc<AtomicU32>,
    live: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Request<Full<Bytes>>>>>,
    delay: Duration,
    chunks: Vec<&'static str>,
    fail: Option<io::ErrorKind>,
}

impl Api {
    fn new(delay: Duration, chunks: Vec<&'static str>) -> Self {
        Self {
            calls: Arc::default(),
            live: Arc::default(),
            seen: Arc::default(),
            delay,
            chunks,
            fail: None,
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<Full<Bytes>>> for Api {
    type Response = Response<Chunks>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<Chunks>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.live.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().push(req);
        let live = Live(self.live.clone());
        let (delay, chunks, fail) = (self.delay, self.chunks.clone(), self.fail);
        Box::pin(async move {
            let _live = live;
            tokio::time::sleep(delay).await;
            if let Some(kind) = fail {
                return Err(io::Error::new(kind, "connection reset by peer").into());
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", "abc".parse().unwrap());
            let body = Chunks(
                chunks
                    .into_iter()
                    .map(|c| Bytes::from_static(c.as_bytes()))
                    .collect(),
                Some(trailers),
            );
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header("x-served", "1")
                .body(body)
                .unwrap())
        })
    }
}

async fn text(res: Response<ResponseBody<Chunks>>) -> (String, Option<HeaderMap>) {
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (
        String::from_utf8(collected.to_bytes().to_vec()).unwrap(),
        trailers,
    )
}

#[tokio::test(start_paused = true)]
async fn a_thousand_identical_gets_make_one_upstream_call() {
    let api = Api::new(ms(50), vec!["one ", "report"]);
    let (layer, handle) = CoalesceLayer::new().pair();
    let client = layer.layer(api.clone());
    let callers: Vec<_> = (0..1_000)
        .map(|_| tokio::spawn(client.clone().oneshot(get("/report"))))
        .collect();
    for c in callers {
        let res = c.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-served"], "1");
        assert!(res.body().is_shared());
        let (body, trailers) = text(res).await;
        assert_eq!(body, "one report");
        assert_eq!(trailers.unwrap()["x-checksum"], "abc");
    }
    assert_eq!(api.calls(), 1);
    let s = handle.stats();
    assert_eq!((s.calls(), s.upstream(), s.joined()), (1_000, 1, 999));
    assert_eq!(
        handle.in_flight(HOST),
        0,
        "the finished call left the table"
    );

    // Not a cache: the next request makes a new call.
    client.clone().oneshot(get("/report")).await.unwrap();
    assert_eq!(api.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn only_identical_requests_share() {
    let api = Api::new(ms(50), vec!["x"]);
    let client = CoalesceLayer::new().layer(api.clone());
    let mut reqs = vec![get("/a"), get("/a?page=2"), get("/b")];
    for token in ["Bearer one", "Bearer two"] {
        let mut r = get("/a");
        r.headers_mut()
            .insert("authorization", token.parse().unwrap());
        reqs.push(r);
    }
    let mut r = get("/a");
    r.headers_mut().insert("x-api-key", "k1".parse().unwrap());
    reqs.push(r);
    // The same as the first but for a trace id: shares its call.
    let mut r = get("/a");
    r.headers_mut()
        .insert("traceparent", "00-abc-def-01".parse().unwrap());
    reqs.push(r);
    let callers: Vec<_> = reqs
        .into_iter()
        .map(|r| tokio::spawn(client.clone().oneshot(r)))
        .collect();
    for c in callers {
        c.await.unwrap().unwrap();
    }
    assert_eq!(api.calls(), 6);
}

#[tokio::test(start_paused = true)]
async fn key_headers_can_be_named() {
    let api = Api::new(ms(50), vec!["x"]);
    let client = CoalesceLayer::new()
        .with_key_headers([HeaderName::from_static("authorization")])
        .layer(api.clone());
    let mut reqs = Vec::new();
    for (auth, other) in [
        ("Bearer one", "a"),
        ("Bearer one", "b"),
        ("Bearer two", "a"),
    ] {
        let mut r = get("/a");
        r.headers_mut()
            .insert("authorization", auth.parse().unwrap());
        r.headers_mut().insert("x-client", other.parse().unwrap());
        reqs.push(tokio::spawn(client.clone().oneshot(r)));
    }
    for c in reqs {
        c.await.unwrap().unwrap();
    }
    assert_eq!(api.calls(), 2, "x-client is not part of the key");
}

#[tokio::test(start_paused = true)]
async fn unsafe_methods_and_bodies_are_never_coalesced() {
    let api = Api::new(ms(50), vec!["x"]);
    let client = CoalesceLayer::new().layer(api.clone());
    let mut callers = Vec::new();
    for _ in 0..3 {
        let post = Request::post(format!("http://{HOST}/orders"))
            .body(Full::default())
            .unwrap();
        callers.push(tokio::spawn(client.clone().oneshot(post)));
        let search = Request::get(format!("http://{HOST}/search"))
            .body(Full::new(Bytes::from_static(b"{\"q\":1}")))
            .unwrap();
        callers.push(tokio::spawn(client.clone().oneshot(search)));
    }
    for c in callers {
        let res = c.await.unwrap().unwrap();
        assert!(!res.body().is_shared());
    }
    assert_eq!(api.calls(), 6);
    let mut head = get("/a");
    *head.method_mut() = Method::HEAD;
    let (a, b) = tokio::join!(
        client.clone().oneshot(head.clone()),
        client.clone().oneshot(head)
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(api.calls(), 7, "HEAD is coalesced");
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_leaves_does_not_cancel_the_others() {
    let api = Api::new(ms(50), vec!["report"]);
    let client = CoalesceLayer::new().layer(api.clone());
    let leader = tokio::spawn(client.clone().oneshot(get("/r")));
    tokio::task::yield_now().await;
    let followers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client.clone().oneshot(get("/r"))))
        .collect();
    tokio::time::sleep(ms(10)).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    assert_eq!(
        api.live.load(Ordering::SeqCst),
        1,
        "the upstream call goes on"
    );
    for f in followers {
        assert_eq!(text(f.await.unwrap().unwrap()).await.0, "report");
    }
    assert_eq!(api.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_last_caller_to_leave_cancels_the_upstream_call() {
    let api = Api::new(ms(50), vec!["report"]);
    let (layer, handle) = CoalesceLayer::new().pair();
    let client = layer.layer(api.clone());
    let callers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client.clone().oneshot(get("/r"))))
        .collect();
    tokio::time::sleep(ms(10)).await;
    assert_eq!(handle.in_flight(HOST), 1);
    for c in callers {
        c.abort();
        let _ = c.await;
    }
    assert_eq!(api.live.load(Ordering::SeqCst), 0, "cancelled");
    assert_eq!(handle.in_flight(HOST), 0, "and out of the table");
    client.clone().oneshot(get("/r")).await.unwrap();
    assert_eq!(api.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_error_is_shared_and_each_caller_can_read_it() {
    let mut api = Api::new(ms(50), vec![]);
    api.fail = Some(io::ErrorKind::ConnectionReset);
    let client = CoalesceLayer::new().layer(api.clone());
    let callers: Vec<_> = (0..5)
        .map(|_| tokio::spawn(client.clone().oneshot(get("/r"))))
        .collect();
    for c in callers {
        let err = c.await.unwrap().unwrap_err();
        let top = err.downcast_ref::<sturdy_core::Error>().unwrap();
        assert_eq!(top.kind(), &ErrorKind::Transport);
        assert_eq!(classify_error(&*err), ErrorKind::Transport);
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
        assert!(sturdy_core::find::<SharedError>(&*err).is_some());
        let io = sturdy_core::find::<io::Error>(&*err).unwrap();
        assert_eq!(io.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(
            err.to_string(),
            "the call shared by identical requests in flight failed: connection reset by peer"
        );
    }
    assert_eq!(api.calls(), 1);
}

/// An error whose own text names no cause, as a hyper-util client's does.
#[derive(Debug)]
struct Wrapper(io::Error);

impl std::fmt::Display for Wrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("client error (SendRequest)")
    }
}

impl std::error::Error for Wrapper {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[tokio::test(start_paused = true)]
async fn a_shared_error_whose_text_names_no_cause_is_told_by_its_cause() {
    let api = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(ms(50)).await;
        Err::<Response<Full<Bytes>>, _>(Wrapper(io::Error::from(io::ErrorKind::ConnectionReset)))
    });
    let client = CoalesceLayer::new().layer(api);
    let callers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client.clone().oneshot(get("/r"))))
        .collect();
    for c in callers {
        let err = c.await.unwrap().unwrap_err();
        let text = err.to_string();
        assert_eq!(
            text,
            "the call shared by identical requests in flight failed: connection reset by peer"
        );
        assert!(sturdy_core::find::<Wrapper>(&*err).is_some());
        // Each text once: the top error does not repeat its source's.
        assert!(!text.contains("SendRequest"), "{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_bound_goes_to_the_first_caller_and_the_others_call_again() {
    let api = Api::new(ms(50), vec!["0123456789", "0123456789", "tail"]);
    let (layer, handle) = CoalesceLayer::new().with_max_body(15).pair();
    let client = layer.layer(api.clone());
    let leader = tokio::spawn(client.clone().oneshot(get("/big")));
    tokio::task::yield_now().await;
    let followers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(client.clone().oneshot(get("/big"))))
        .collect();
    let res = leader.await.unwrap().unwrap();
    assert!(!res.body().is_shared());
    let (body, trailers) = text(res).await;
    assert_eq!(
        body, "01234567890123456789tail",
        "read part, then the rest, streamed"
    );
    assert!(trailers.is_some());
    for f in followers {
        assert_eq!(
            text(f.await.unwrap().unwrap()).await.0,
            "01234567890123456789tail"
        );
    }
    // The first call, then one of their own for each follower (they arrived together, so their
    // own calls share nothing: each had already joined the first).
    assert_eq!(api.calls(), 3);
    let s = handle.stats();
    assert_eq!((s.too_large(), s.fallbacks()), (1, 2));
}

#[tokio::test(start_paused = true)]
async fn when_the_first_caller_left_another_takes_the_large_body() {
    let api = Api::new(ms(50), vec!["0123456789", "0123456789"]);
    let client = CoalesceLayer::new().with_max_body(15).layer(api.clone());
    let leader = tokio::spawn(client.clone().oneshot(get("/big")));
    tokio::task::yield_now().await;
    let follower = tokio::spawn(client.clone().oneshot(get("/big")));
    tokio::time::sleep(ms(10)).await;
    leader.abort();
    let _ = leader.await;
    let (body, _) = text(follower.await.unwrap().unwrap()).await;
    assert_eq!(body, "01234567890123456789");
    assert_eq!(api.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_leaders_request_reaches_the_service_with_its_extensions() {
    #[derive(Clone, Debug, PartialEq)]
    struct Tag(u32);
    let api = Api::new(ms(5), vec!["x"]);
    let client = CoalesceLayer::new().layer(api.clone());
    let mut r = get("/r");
    r.extensions_mut().insert(Tag(7));
    client.clone().oneshot(r).await.unwrap();
    let seen = api.seen.lock().unwrap();
    assert_eq!(seen[0].extensions().get::<Tag>(), Some(&Tag(7)));
}

// ===== readiness =====

#[tokio::test(start_paused = true)]
async fn poll_ready_is_the_inner_services() {
    let (mut svc, mut handle) =
        tower_test::mock::spawn_layer::<Request<Full<Bytes>>, Response<Full<Bytes>>, _>(
            CoalesceLayer::new(),
        );
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(get("/r")));
    let (_, send) = handle.next_request().await.unwrap();
    assert_pending!(fut.poll());
    send.send_response(Response::new(Full::new(Bytes::from("ok"))));
    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
}

/// Over `ConcurrencyLimit(2)`: the leader's call holds one permit; a joining request gives back
/// the permit its `poll_ready` reserved at once, so a third caller can get ready and join too.
#[tokio::test(start_paused = true)]
async fn a_joining_request_gives_back_what_poll_ready_reserved() {
    let api = Api::new(ms(50), vec!["x"]);
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new())
        .layer(ConcurrencyLimitLayer::new(2))
        .service(api.clone());
    let mut a = svc.clone();
    let mut b = svc.clone();
    let mut c = svc.clone();
    let fa = a.ready().await.unwrap().call(get("/r"));
    let fb = b.ready().await.unwrap().call(get("/r"));
    let fc = tokio::time::timeout(ms(1), c.ready())
        .await
        .expect("b's permit was given back")
        .unwrap()
        .call(get("/r"));
    let (ra, rb, rc) = tokio::join!(fa, fb, fc);
    for r in [ra, rb, rc] {
        r.unwrap();
    }
    assert_eq!(api.calls(), 1);
}

#[test]
fn traits() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}
    send_sync_clone::<CoalesceLayer>();
    send_sync_clone::<Coalesce<Api, sturdy_core::ByHost>>();
    send::<ResponseFuture<Api, Full<Bytes>>>();
    send::<ResponseBody<Chunks>>();
}

#[tokio::test(start_paused = true)]
async fn calls_that_join_are_events() {
    let api = Api::new(ms(50), vec!["x"]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let layer = CoalesceLayer::new().on_event(move |e| {
        if let sturdy_core::events::Event::Coalesced { key, host, method } = *e {
            s.lock()
                .unwrap()
                .push((key.to_owned(), host.map(str::to_owned), method.clone()));
        }
    });
    let client = layer.layer(api.clone());
    let callers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client.clone().oneshot(get("/report"))))
        .collect();
    for c in callers {
        assert_eq!(c.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(api.calls(), 1);
    let joined = (HOST.to_owned(), Some(HOST.to_owned()), Method::GET);
    assert_eq!(*seen.lock().unwrap(), [joined.clone(), joined]);
}

type Joining = Pin<
    Box<dyn std::future::Future<Output = Result<Response<ResponseBody<Chunks>>, BoxError>> + Send>,
>;
type Outer = tower::util::BoxCloneSyncService<
    Request<Full<Bytes>>,
    Response<ResponseBody<Chunks>>,
    BoxError,
>;

/// An inner service whose `call` sends an identical request through the coalescing service
/// itself, once: what a request on another thread does when it arrives while the leader is
/// still inside the inner service's `call` (a window a preempted thread can hold open for a
/// whole time slice). Optionally it then panics, as a leader that never sends its call.
#[derive(Clone)]
struct Reenter {
    api: Api,
    outer: Arc<std::sync::OnceLock<Outer>>,
    once: Arc<std::sync::atomic::AtomicBool>,
    joined: Arc<Mutex<Vec<Joining>>>,
    panic: bool,
}

impl Reenter {
    fn new(api: Api, panic: bool) -> Self {
        Self {
            api,
            outer: Arc::default(),
            once: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            joined: Arc::default(),
            panic,
        }
    }

    fn take_joined(&self) -> Joining {
        self.joined
            .lock()
            .unwrap()
            .pop()
            .expect("the inner call sent one request")
    }
}

impl Service<Request<Full<Bytes>>> for Reenter {
    type Response = Response<Chunks>;
    type Error = BoxError;
    type Future = <Api as Service<Request<Full<Bytes>>>>::Future;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        if self.once.swap(false, Ordering::SeqCst) {
            let mut outer = self.outer.get().expect("set before the first call").clone();
            // Called now, inside this call (a oneshot would call only when polled).
            let ready = futures_util::FutureExt::now_or_never(outer.ready());
            assert!(
                ready.is_some_and(|r| r.is_ok()),
                "the stack is always ready"
            );
            self.joined
                .lock()
                .unwrap()
                .push(Box::pin(outer.call(get("/report"))));
        }
        if self.panic {
            panic!("the inner service failed inside call");
        }
        self.api.call(req)
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_that_arrives_while_the_leader_is_calling_the_service_joins_its_call() {
    let api = Api::new(ms(50), vec!["one ", "report"]);
    let inner = Reenter::new(api.clone(), false);
    let (layer, handle) = CoalesceLayer::new().pair();
    let client = Outer::new(layer.layer(inner.clone()));
    let _ = inner.outer.set(client.clone());

    let leader = tokio::spawn(client.clone().oneshot(get("/report")));
    tokio::task::yield_now().await;
    // The identical request sent from inside the leader's inner call joined the leader's call:
    // it did not start a second one (its future is only polled now, after the leader's call).
    let follower = inner.take_joined();
    let (a, b) = (leader.await.unwrap().unwrap(), follower.await.unwrap());
    assert_eq!(text(a).await.0, "one report");
    assert_eq!(text(b).await.0, "one report");
    assert_eq!(api.calls(), 1);
    let s = handle.stats();
    assert_eq!((s.calls(), s.upstream(), s.joined()), (2, 1, 1));
    assert_eq!(
        handle.in_flight(HOST),
        0,
        "the finished call left the table"
    );
}

#[tokio::test(start_paused = true)]
async fn callers_who_joined_a_leader_that_never_sent_its_call_get_an_error_not_a_hang() {
    let api = Api::new(ms(50), vec!["x"]);
    let inner = Reenter::new(api.clone(), true);
    let (layer, handle) = CoalesceLayer::new().pair();
    let client = Outer::new(layer.layer(inner.clone()));
    let _ = inner.outer.set(client.clone());

    let leader = tokio::spawn(client.clone().oneshot(get("/report")));
    assert!(leader.await.unwrap_err().is_panic());
    let err = inner.take_joined().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the call shared by identical requests in flight failed: the request that was to send \
         this shared call failed before sending it"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(api.calls(), 0);
    assert_eq!(
        handle.in_flight(HOST),
        0,
        "the abandoned call left the table"
    );
}

/// A body that sends one chunk, then nothing, never ending.
struct Stalls(Option<Bytes>);

impl Body for Stalls {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.0.take() {
            Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
            None => Poll::Pending,
        }
    }
}

/// A head followed by a stalled body: every caller gets a timeout error once the body timeout
/// has passed since the head (not a hang), and without the bound they wait.
#[tokio::test(start_paused = true)]
async fn a_stalled_shared_body_ends_in_a_timeout_for_every_caller() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let api = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(10)).await;
            Ok::<_, BoxError>(Response::new(Stalls(Some(Bytes::from_static(b"abc")))))
        }
    });
    let svc = CoalesceLayer::new()
        .with_body_timeout(Duration::from_secs(2))
        .layer(api);
    let started = tokio::time::Instant::now();
    let a = tokio::spawn(svc.clone().oneshot(get("/slow")));
    tokio::task::yield_now().await;
    let b = tokio::spawn(svc.clone().oneshot(get("/slow")));
    for r in [a.await.unwrap(), b.await.unwrap()] {
        let err = r.expect_err("a timeout, not a response");
        assert_eq!(classify_error(&*err), ErrorKind::Timeout, "{err}");
        assert!(
            err.to_string()
                .contains("the shared response's body did not arrive within 2s of its head"),
            "{err}"
        );
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(started.elapsed(), ms(10) + Duration::from_secs(2));

    // Unbounded when asked: still waiting an hour later.
    let svc = CoalesceLayer::new()
        .without_body_timeout()
        .layer(tower::service_fn(|_r: Request<Full<Bytes>>| async {
            Ok::<_, BoxError>(Response::new(Stalls(Some(Bytes::from_static(b"abc")))))
        }));
    let out = tokio::time::timeout(Duration::from_secs(3600), svc.oneshot(get("/slow"))).await;
    assert!(out.is_err(), "the call ended");
}

/// A shared call that panics while it runs (in the stack below, a hook, the inner service's
/// future) must not leave the callers who joined it waiting forever, nor stay in the table for
/// the next identical request to join and panic in turn.
#[tokio::test(start_paused = true)]
async fn a_shared_call_that_panics_fails_every_caller_and_leaves_nothing_behind() {
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let api = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(50)).await;
            if n == 0 {
                panic!("a bug below");
            }
            Ok::<_, BoxError>(Response::new(Full::from("fine")))
        }
    });
    let (layer, handle) = CoalesceLayer::new().pair();
    let client = layer.layer(api);
    let callers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client.clone().oneshot(get("/r"))))
        .collect();
    for c in callers {
        let err = tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("a caller was left waiting")
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert!(err.to_string().contains("a bug below"), "{err}");
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(handle.in_flight(HOST), 0);
    // The next identical request is a call of its own.
    let res = client.clone().oneshot(get("/r")).await.unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "fine");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
