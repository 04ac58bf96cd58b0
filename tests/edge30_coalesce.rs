//! `CoalesceLayer` against a real hyper server on loopback: which calls share one upstream
//! request (docs/guides/coalesce.md, the crate docs), cancellation of leaders and followers,
//! large and stalled bodies, shared errors, and composition with tower's layers.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use sturdy::coalesce::{CoalesceHandle, CoalesceLayer, ResponseBody, SharedError};
use sturdy::core::{BoxError, Delivery, ErrorKind};
use tokio::sync::watch;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::edge30_util::{client, full, serve, until, DropGuard, SrvBody};

/// What the server saw, and the gate its handlers wait on.
#[derive(Clone)]
struct Srv {
    count: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
    authority: String,
}

impl Srv {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.authority)
    }
    fn open(&self) {
        self.gate.send_replace(true);
    }
    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// Paths: `/big?n=` a body of n bytes with a length, `/chunked?n=` without one, `/stall` a head
/// and one byte then nothing; anything else answers with its path and query. Every handler
/// waits at the gate first (unless the gate is open).
async fn server() -> Srv {
    let (gate, _) = watch::channel(false);
    let count = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicUsize::new(0));
    let (c, x, g) = (count.clone(), cancelled.clone(), gate.clone());
    let addr = serve(move |req: Request<Incoming>| {
        let (c, x, mut rx) = (c.clone(), x.clone(), g.subscribe());
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            let mut guard = DropGuard(x, false);
            let _ = rx.wait_for(|open| *open).await;
            guard.1 = true;
            let path = req.uri().path().to_owned();
            let n: usize = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            match path.as_str() {
                "/big" => Response::new(full(pattern(n))),
                "/chunked" => {
                    let data = pattern(n);
                    let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> =
                        data.chunks(4096)
                            .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
                            .collect();
                    Response::new(SrvBody::new(StreamBody::new(futures_util::stream::iter(
                        chunks,
                    ))))
                }
                "/stall" => {
                    let s = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
                        http_body::Frame::data(Bytes::from_static(b"a")),
                    )])
                    .chain(futures_util::stream::pending());
                    Response::new(SrvBody::new(StreamBody::new(s)))
                }
                _ => {
                    let auth = req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap_or("").to_owned())
                        .unwrap_or_default();
                    Response::builder()
                        .header("x-seen-auth", auth.clone())
                        .body(full(format!("{} {} {auth}", req.method(), req.uri())))
                        .unwrap()
                }
            }
        }
    })
    .await;
    Srv {
        count,
        cancelled,
        gate,
        authority: addr.to_string(),
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

type Svc = sturdy::coalesce::Coalesce<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    sturdy::coalesce::ByHost,
>;

fn coalesced(layer: CoalesceLayer) -> (Svc, CoalesceHandle) {
    let (layer, handle) = layer.pair();
    (layer.layer(client()), handle)
}

async fn body<B>(res: Response<B>) -> Bytes
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    res.into_body().collect().await.unwrap().to_bytes()
}

type Join = tokio::task::JoinHandle<Result<Response<ResponseBody<Incoming>>, BoxError>>;

fn spawn_call(svc: &Svc, req: Request<Full<Bytes>>) -> Join {
    tokio::spawn(svc.clone().oneshot(req))
}

#[test]
fn shared_types_are_send_sync_clone() {
    fn ssc<T: Send + Sync + Clone + 'static>() {}
    fn send<T: Send + 'static>() {}
    ssc::<CoalesceLayer>();
    ssc::<CoalesceHandle>();
    ssc::<Svc>();
    ssc::<SharedError>();
    send::<sturdy::coalesce::ResponseFuture<Svc, Full<Bytes>>>();
    send::<ResponseBody<Incoming>>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identical_gets_one_request_same_bytes() {
    let srv = server().await;
    let (svc, h) = coalesced(CoalesceLayer::new());
    let url = srv.url("/big?n=300000");
    let calls: Vec<Join> = (0..50).map(|_| spawn_call(&svc, get(&url))).collect();
    until("49 joined", || h.stats().joined() == 49).await;
    assert_eq!(h.in_flight(&srv.authority), 1);
    srv.open();
    let want = pattern(300_000);
    for c in calls {
        let res = c.await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.body().is_shared());
        assert_eq!(&body(res).await[..], &want[..]);
    }
    assert_eq!(srv.count(), 1);
    let s = h.stats();
    assert_eq!((s.calls(), s.upstream(), s.joined()), (50, 1, 49));
    assert_eq!(h.in_flight(&srv.authority), 0);
    // Not a cache: the next request is a new call.
    let _ = body(svc.clone().oneshot(get(&url)).await.unwrap()).await;
    assert_eq!(srv.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_separate_trace_ids_do_not() {
    let srv = server().await;
    let (svc, h) = coalesced(CoalesceLayer::new());
    let url = srv.url("/me");
    let with = |auth: &str, trace: &str| {
        Request::get(&url)
            .header("authorization", auth)
            .header("traceparent", trace)
            .header("x-request-id", trace)
            .body(Full::default())
            .unwrap()
    };
    let a1 = spawn_call(&svc, with("Bearer alice", "00-1"));
    until("first upstream", || srv.count() == 1).await;
    let b = spawn_call(&svc, with("Bearer bob", "00-2"));
    until("second upstream", || srv.count() == 2).await;
    let a2 = spawn_call(&svc, with("Bearer alice", "00-3"));
    until("alice joined", || h.stats().joined() == 1).await;
    srv.open();
    let a1 = a1.await.unwrap().unwrap();
    let a2 = a2.await.unwrap().unwrap();
    let b = b.await.unwrap().unwrap();
    assert_eq!(a1.headers()["x-seen-auth"], "Bearer alice");
    assert_eq!(a2.headers()["x-seen-auth"], "Bearer alice");
    assert_eq!(b.headers()["x-seen-auth"], "Bearer bob");
    assert!(body(b).await.ends_with(b"Bearer bob"));
    assert_eq!(srv.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_range_cookie_and_query_separate() {
    let srv = server().await;
    let (svc, h) = coalesced(CoalesceLayer::new());
    let base = srv.url("/r");
    let reqs = vec![
        get(&base),
        Request::get(&base)
            .header("accept", "text/csv")
            .body(Full::default())
            .unwrap(),
        Request::get(&base)
            .header("range", "bytes=0-1")
            .body(Full::default())
            .unwrap(),
        Request::get(&base)
            .header("cookie", "s=1")
            .body(Full::default())
            .unwrap(),
        Request::get(&base)
            .header("if-none-match", "\"x\"")
            .body(Full::default())
            .unwrap(),
        Request::get(&base)
            .header("x-api-key", "k")
            .body(Full::default())
            .unwrap(),
        get(&format!("{base}?a=1")),
        get(&format!("{base}/")),
        Request::head(&base).body(Full::default()).unwrap(),
    ];
    let n = reqs.len();
    let calls: Vec<Join> = reqs.into_iter().map(|r| spawn_call(&svc, r)).collect();
    until("every distinct request upstream", || srv.count() == n).await;
    assert_eq!(h.stats().joined(), 0);
    srv.open();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(srv.count(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_order_of_different_names_does_not_matter() {
    let srv = server().await;
    let (svc, h) = coalesced(CoalesceLayer::new());
    let url = srv.url("/o");
    let a = Request::get(&url)
        .header("accept", "a/b")
        .header("x-tenant", "t")
        .body(Full::default())
        .unwrap();
    let b = Request::get(&url)
        .header("x-tenant", "t")
        .header("accept", "a/b")
        .body(Full::default())
        .unwrap();
    let ca = spawn_call(&svc, a);
    until("first upstream", || srv.count() == 1).await;
    let cb = spawn_call(&svc, b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let joined = h.stats().joined();
    srv.open();
    ca.await.unwrap().unwrap();
    cb.await.unwrap().unwrap();
    assert_eq!(joined, 1, "same headers, another order: one call");
    assert_eq!(srv.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_and_bodies_never_coalesce() {
    let srv = server().await;
    let (svc, h) = coalesced(CoalesceLayer::new());
    let url = srv.url("/orders");
    let mut calls = Vec::new();
    for m in [
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ] {
        for _ in 0..3 {
            let r = Request::builder()
                .method(m.clone())
                .uri(&url)
                .body(Full::default())
                .unwrap();
            calls.push(spawn_call(&svc, r));
        }
    }
    // A GET with a body (a search API).
    for _ in 0..3 {
        let r = Request::get(&url).body(Full::from("q=1")).unwrap();
        calls.push(spawn_call(&svc, r));
    }
    let n = calls.len();
    until("every request upstream", || srv.count() == n).await;
    srv.open();
    for c in calls {
        let res = c.await.unwrap().unwrap();
        assert!(!res.body().is_shared());
    }
    assert_eq!(srv.count(), n);
    assert_eq!(
        h.stats().calls(),
        0,
        "only GET and HEAD with an empty body count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_options_go_alone() {
    let srv = server().await;
    let (svc, h) = coalesced(CoalesceLayer::new());
    let url = srv.url("/opt");
    let a = spawn_call(&svc, get(&url));
    until("first upstream", || srv.count() == 1).await;
    let mut r = get(&url);
    r.extensions_mut()
        .insert(sturdy::core::CallOptions::new().with_deadline(Duration::from_secs(30)));
    let b = spawn_call(&svc, r);
    until("the request with options goes on its own", || {
        srv.count() == 2
    })
    .await;
    srv.open();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(h.stats().joined(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_leader_does_not_fail_or_hang_followers() {
    let srv = server().await;
    let (svc, h) = coalesced(CoalesceLayer::new());
    let url = srv.url("/lead");
    let leader = spawn_call(&svc, get(&url));
    until("leader upstream", || srv.count() == 1).await;
    let followers: Vec<Join> = (0..5).map(|_| spawn_call(&svc, get(&url))).collect();
    until("5 joined", || h.stats().joined() == 5).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_millis(50)).await;
    srv.open();
    for f in followers {
        let res = tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("a follower hangs after its leader was aborted")
            .unwrap()
            .unwrap();
        assert_eq!(body(res).await, format!("GET /lead "));
    }
    assert_eq!(srv.count(), 1);
    assert_eq!(srv.cancelled.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_under_its_own_timeout_leaves_the_call_to_followers() {
    let srv = server().await;
    let (layer, h) = CoalesceLayer::new().pair();
    let plain = layer.layer(client());
    let timed = ServiceBuilder::new()
        .timeout(Duration::from_millis(100))
        .service(plain.clone());
    let url = srv.url("/t");
    let leader = tokio::spawn(timed.clone().oneshot(get(&url)));
    until("leader upstream", || srv.count() == 1).await;
    let follower = tokio::spawn(plain.clone().oneshot(get(&url)));
    let err = leader.await.unwrap().unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    until("follower joined", || h.stats().joined() == 1).await;
    srv.open();
    let res = follower.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(srv.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_caller_leaving_cancels_upstream_and_clears_the_table() {
    let srv = server().await;
    let (layer, h) = CoalesceLayer::new().pair();
    let timed = ServiceBuilder::new()
        .timeout(Duration::from_millis(200))
        .service(layer.layer(client()));
    let url = srv.url("/gone");
    let calls: Vec<_> = (0..4)
        .map(|_| tokio::spawn(timed.clone().oneshot(get(&url))))
        .collect();
    for c in calls {
        assert!(c.await.unwrap().is_err());
    }
    assert_eq!(srv.count(), 1);
    until("the upstream call cancelled at the server", || {
        srv.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(h.in_flight(&srv.authority), 0);
    srv.open();
    let res = layer.layer(client()).oneshot(get(&url)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(srv.count(), 2, "the next identical request starts afresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_followers_do_not_disturb_the_rest() {
    let srv = server().await;
    let (svc, h) = coalesced(CoalesceLayer::new());
    let url = srv.url("/f");
    let leader = spawn_call(&svc, get(&url));
    until("leader upstream", || srv.count() == 1).await;
    let followers: Vec<Join> = (0..6).map(|_| spawn_call(&svc, get(&url))).collect();
    until("6 joined", || h.stats().joined() == 6).await;
    let mut keep = Vec::new();
    for (i, f) in followers.into_iter().enumerate() {
        if i % 2 == 0 {
            f.abort();
        } else {
            keep.push(f);
        }
    }
    srv.open();
    assert_eq!(body(leader.await.unwrap().unwrap()).await, "GET /f ");
    for f in keep {
        assert_eq!(body(f.await.unwrap().unwrap()).await, "GET /f ");
    }
    assert_eq!(srv.count(), 1);
    assert_eq!(srv.cancelled.load(Ordering::SeqCst), 0);
}

async fn too_large(path: &str) {
    let srv = server().await;
    let (svc, h) = coalesced(CoalesceLayer::new().with_max_body(1024));
    let url = srv.url(&format!("{path}?n=100000"));
    let leader = spawn_call(&svc, get(&url));
    until("leader upstream", || srv.count() == 1).await;
    let followers: Vec<Join> = (0..4).map(|_| spawn_call(&svc, get(&url))).collect();
    until("4 joined", || h.stats().joined() == 4).await;
    srv.open();
    let want = pattern(100_000);
    let res = leader.await.unwrap().unwrap();
    assert!(!res.body().is_shared());
    assert_eq!(
        &body(res).await[..],
        &want[..],
        "{path}: the leader's stream"
    );
    for f in followers {
        assert_eq!(&body(f.await.unwrap().unwrap()).await[..], &want[..]);
    }
    assert_eq!(srv.count(), 5, "{path}: every follower sent its own");
    let s = h.stats();
    assert_eq!((s.too_large(), s.fallbacks()), (1, 4), "{path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_bound_with_a_length() {
    too_large("/big").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_bound_streamed_without_a_length() {
    too_large("/chunked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_bound_leader_gone_a_follower_takes_the_response() {
    let srv = server().await;
    let (svc, h) = coalesced(CoalesceLayer::new().with_max_body(1024));
    let url = srv.url("/big?n=50000");
    let leader = spawn_call(&svc, get(&url));
    until("leader upstream", || srv.count() == 1).await;
    let followers: Vec<Join> = (0..3).map(|_| spawn_call(&svc, get(&url))).collect();
    until("3 joined", || h.stats().joined() == 3).await;
    leader.abort();
    let _ = leader.await;
    srv.open();
    let want = pattern(50_000);
    for f in followers {
        assert_eq!(&body(f.await.unwrap().unwrap()).await[..], &want[..]);
    }
    assert_eq!(
        srv.count(),
        3,
        "one follower took the leader's response, two sent their own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_shared_body_times_out_for_each_caller_naming_the_wait() {
    let srv = server().await;
    srv.open();
    let (svc, _h) = coalesced(CoalesceLayer::new().with_body_timeout(Duration::from_millis(300)));
    let url = srv.url("/stall");
    let calls: Vec<Join> = (0..3).map(|_| spawn_call(&svc, get(&url))).collect();
    for c in calls {
        let err = tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("bounded by the body timeout")
            .unwrap()
            .unwrap_err();
        let e = sturdy::core::find::<sturdy::core::Error>(&*err).expect("a sturdy error");
        assert_eq!(*e.kind(), ErrorKind::Timeout, "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("did not arrive within 300ms of its head"),
            "{msg}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_shared_error_names_the_cause() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (svc, _h) = coalesced(CoalesceLayer::new());
    let url = format!("http://127.0.0.1:{port}/x");
    let calls: Vec<Join> = (0..5).map(|_| spawn_call(&svc, get(&url))).collect();
    for c in calls {
        let err = c.await.unwrap().unwrap_err();
        let msg = err.to_string();
        // A refused connect can fail before the next task has even been spawned on the other
        // worker: a call nobody joined keeps its own words (docs/guides/coalesce.md), so the
        // prefix is there only when another request joined.
        assert!(sturdy::core::find::<SharedError>(&*err).is_some());
        assert!(
            msg.contains("refused"),
            "the message names the cause: {msg}"
        );
        assert!(sturdy::core::find::<hyper_util::client::legacy::Error>(&*err).is_some());
        assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
        assert_eq!(
            sturdy::core::classify::classify_error(&*err),
            ErrorKind::Connect
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_closed_after_the_request_is_maybe_processed() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let s2 = s2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                s2.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(s);
            });
        }
    });
    let (svc, h) = coalesced(CoalesceLayer::new());
    let url = format!("http://{addr}/x");
    let calls: Vec<Join> = (0..4).map(|_| spawn_call(&svc, get(&url))).collect();
    for c in calls {
        let err = c.await.unwrap().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("the call shared by identical requests in flight failed: "),
            "{msg}"
        );
        assert_eq!(
            sturdy::core::classify::delivery(&*err),
            Delivery::MaybeProcessed,
            "{msg}"
        );
        assert!(
            !msg.ends_with("client error (SendRequest)"),
            "the message names a cause: {msg}"
        );
    }
    assert_eq!(seen.load(Ordering::SeqCst) as u64, h.stats().upstream());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_buffer_and_concurrency_limit_one_identical_calls_still_share() {
    let srv = server().await;
    let (layer, h) = CoalesceLayer::new().pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .buffer(64)
        .concurrency_limit(1)
        .service(client());
    let url = srv.url("/b");
    let calls: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot(get(&url))))
        .collect();
    until("9 joined", || h.stats().joined() == 9).await;
    srv.open();
    for c in calls {
        assert_eq!(body(c.await.unwrap().unwrap()).await, "GET /b ");
    }
    assert_eq!(srv.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_service_ready_call_shares() {
    let srv = server().await;
    let (mut svc, h) = coalesced(CoalesceLayer::new());
    let url = srv.url("/k");
    let mut futs = Vec::new();
    for _ in 0..10 {
        let f = svc.ready().await.unwrap().call(get(&url));
        futs.push(tokio::spawn(f));
    }
    until("9 joined", || h.stats().joined() == 9).await;
    srv.open();
    for f in futs {
        assert_eq!(body(f.await.unwrap().unwrap()).await, "GET /k ");
    }
    assert_eq!(srv.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_key_headers_shares_across_other_headers_and_empty_ignore_list_separates() {
    let srv = server().await;
    let (svc, h) = coalesced(CoalesceLayer::new().with_key_headers([http::header::AUTHORIZATION]));
    let url = srv.url("/kh");
    let a = spawn_call(
        &svc,
        Request::get(&url)
            .header("authorization", "A")
            .header("user-agent", "one")
            .body(Full::default())
            .unwrap(),
    );
    until("first", || srv.count() == 1).await;
    let b = spawn_call(
        &svc,
        Request::get(&url)
            .header("authorization", "A")
            .header("user-agent", "two")
            .body(Full::default())
            .unwrap(),
    );
    until("joined", || h.stats().joined() == 1).await;
    let c = spawn_call(
        &svc,
        Request::get(&url)
            .header("authorization", "B")
            .body(Full::default())
            .unwrap(),
    );
    until("other credentials upstream", || srv.count() == 2).await;

    let (svc2, h2) = coalesced(CoalesceLayer::new().with_ignored_headers([]));
    let d = spawn_call(
        &svc2,
        Request::get(&url)
            .header("traceparent", "1")
            .body(Full::default())
            .unwrap(),
    );
    until("third", || srv.count() == 3).await;
    let e = spawn_call(
        &svc2,
        Request::get(&url)
            .header("traceparent", "2")
            .body(Full::default())
            .unwrap(),
    );
    until("an empty ignore list compares every header", || {
        srv.count() == 4
    })
    .await;
    assert_eq!(h2.stats().joined(), 0);
    srv.open();
    for j in [a, b, c, d, e] {
        j.await.unwrap().unwrap();
    }
}
