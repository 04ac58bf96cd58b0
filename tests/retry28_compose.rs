//! The retry layer and the composed client under tower's `Buffer`, `ConcurrencyLimit(1)`,
//! `Timeout` and tower-test's mock, kept services, clones from many tasks, and futures dropped
//! at each await (during a backoff, a Retry-After wait, while the body is read for replay).
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use sturdy::core::BoxError;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::{Client, ClientBuilder};
use tokio::sync::mpsc;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::buffer::Buffer;
use tower::limit::ConcurrencyLimit;
use tower::timeout::Timeout;
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

use crate::retry28_common::*;

const URL: &str = "http://api.example.com/orders";
const BOUND: Duration = Duration::from_secs(600);

fn assert_clone_send_sync<T: Clone + Send + Sync + 'static>(_: &T) {}
fn assert_send<T: Send>(_: &T) {}

/// Each path answers 503 on its first request, then 200.
fn first_503_per_path() -> (Api, Seen) {
    api(|_, r| {
        Ok(
            if r.uri.ends_with("/first") || !r.headers.contains_key("x-second") {
                status(503)
            } else {
                status(200)
            },
        )
    })
}

/// Answers 503 to the first request with each `x-id`, 200 to the next ones.
fn alternating() -> (Api, Seen) {
    let firsts = std::sync::Mutex::new(std::collections::HashSet::new());
    api(move |_, r| {
        let id = r
            .headers
            .get("x-id")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        Ok(if firsts.lock().unwrap().insert(id) {
            status(503)
        } else {
            status(200)
        })
    })
}

/// A request with its own `x-id`.
fn tagged(mut r: Req, id: usize) -> Req {
    r.headers_mut()
        .insert("x-id", id.to_string().parse().unwrap());
    r
}

#[tokio::test(start_paused = true)]
async fn the_client_and_its_futures_are_send_sync_clone() {
    let (svc, _) = api(|_, _| Ok(status(200)));
    let client: Client<Full<Bytes>> = ClientBuilder::new().build(svc.clone());
    assert_clone_send_sync(&client);
    let fut = client.clone().oneshot(get(URL));
    assert_send(&fut);
    fut.await.unwrap();
    let retry = RetryLayer::new().layer(svc);
    assert_clone_send_sync(&retry);
    assert_clone_send_sync(&RetryLayer::new());
    let fut = retry.oneshot(get(URL));
    assert_send(&fut);
    fut.await.unwrap();
    let _unused = first_503_per_path;
}

#[tokio::test(start_paused = true)]
async fn retry_over_concurrency_limit_one_from_many_tasks() {
    let (svc, seen) = alternating();
    let client = RetryLayer::new()
        .with_seed(1)
        .without_budget()
        .layer(ConcurrencyLimit::new(svc, 1));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = client.clone();
        tasks.push(tokio::spawn(c.oneshot(tagged(get(URL), i))));
    }
    tokio::time::timeout(BOUND, async {
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().status(), 200);
        }
    })
    .await
    .expect("calls over ConcurrencyLimit(1) hung");
    assert!(seen.len() >= 20);
}

#[tokio::test(start_paused = true)]
async fn a_kept_client_over_concurrency_limit_one_retries_without_hanging() {
    let (svc, seen) = alternating();
    let mut client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(3))
        .build(ConcurrencyLimit::new(svc, 1));
    tokio::time::timeout(BOUND, async {
        for i in 0..10 {
            let res = client
                .ready()
                .await
                .unwrap()
                .call(tagged(get(URL), i))
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
        }
    })
    .await
    .expect("a kept ready().call() loop hung");
    assert_eq!(seen.len(), 20);
}

#[tokio::test(start_paused = true)]
async fn the_client_under_buffer_one_from_many_tasks() {
    let (svc, seen) = alternating();
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(5).without_budget())
        .build(svc);
    let buffered = Buffer::new(client, 1);
    let mut tasks = Vec::new();
    for i in 0..30 {
        let mut b = buffered.clone();
        tasks.push(tokio::spawn(async move {
            let r = tagged(
                if i % 2 == 0 {
                    post(URL, "{}")
                } else {
                    get(URL)
                },
                i,
            );
            b.ready().await?.call(r).await
        }));
    }
    tokio::time::timeout(BOUND, async {
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().status(), 200);
        }
    })
    .await
    .expect("Buffer(1) over the client hung");
    assert!(seen.len() >= 30);
    // Every POST carried a key (and so could be retried).
    assert!(seen
        .all()
        .iter()
        .filter(|r| r.method == http::Method::POST)
        .all(|r| r.headers.contains_key("idempotency-key")));
}

#[tokio::test(start_paused = true)]
async fn the_client_over_buffer_one() {
    let (svc, seen) = alternating();
    let buffered = Buffer::new(svc, 1);
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(6).without_budget())
        .build(buffered);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let c = client.clone();
        tasks.push(tokio::spawn(
            async move { c.oneshot(tagged(get(URL), i)).await },
        ));
    }
    tokio::time::timeout(BOUND, async {
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().status(), 200);
        }
    })
    .await
    .expect("the client over Buffer(1) hung");
    assert!(seen.len() >= 16);
}

#[tokio::test(start_paused = true)]
async fn readiness_is_the_inner_services_also_for_a_retry() {
    let (inner, mut handle) = mock::pair::<Req, Res>();
    let mut svc = RetryLayer::new().with_seed(1).layer(inner);
    handle.allow(0);
    assert_pending!(tokio_test::task::spawn(()).enter(|cx, _| svc.poll_ready(cx)));
    handle.allow(1);
    assert_ready_ok!(tokio_test::task::spawn(()).enter(|cx, _| svc.poll_ready(cx)));
    let fut = tokio::spawn(svc.call(get(URL)));
    let (_r, send) = handle.next_request().await.unwrap();
    send.send_response(status(503));
    // The retry waits for readiness again: with none allowed, no second request.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(tokio_test::task::spawn(handle.next_request())
        .poll()
        .is_pending());
    handle.allow(1);
    let (_r, send) = handle.next_request().await.unwrap();
    send.send_response(status(200));
    assert_eq!(fut.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_ready_service_dropped_before_its_call_frees_the_limit() {
    let (svc, seen) = api(|_, _| Ok(status(200)));
    let base = ClientBuilder::new().build(ConcurrencyLimit::new(svc, 1));
    let mut held = base.clone();
    held.ready().await.unwrap();
    drop(held);
    tokio::time::timeout(Duration::from_secs(5), base.oneshot(get(URL)))
        .await
        .expect("the permit of a dropped ready service stayed held")
        .unwrap();
    assert_eq!(seen.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropped_during_a_backoff_sends_nothing_more() {
    let (svc, seen) = api(|_, _| Ok(status(503)));
    let c = RetryLayer::new().with_seed(1).layer(svc);
    let task = tokio::spawn(c.oneshot(get(URL)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(seen.len(), 1);
    task.abort();
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(seen.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn tower_timeout_around_a_retry_after_wait_leaves_nothing_held() {
    let (svc, seen) = api(|n, _| {
        Ok(if n == 0 {
            with_retry_after(429, "10")
        } else {
            status(200)
        })
    });
    let client = ClientBuilder::new()
        .without_rate_limit()
        .with_retry(RetryLayer::new().with_seed(1))
        .build(ConcurrencyLimit::new(svc, 1));
    let mut outer = Timeout::new(client.clone(), Duration::from_secs(2));
    let err = outer
        .ready()
        .await
        .unwrap()
        .call(get(URL))
        .await
        .unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(seen.len(), 1);
    // The next call goes through at once: no permit and no pause left behind by the dropped call.
    let start = tokio::time::Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(5), client.oneshot(get(URL)))
        .await
        .expect("hung after a dropped call")
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(start.elapsed() < Duration::from_millis(10));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(seen.len(), 2, "the dropped call was retried later");
}

/// A body whose size is known and whose bytes come from a channel.
enum SlowBody {
    Chan(mpsc::Receiver<Bytes>, u64, bool),
    Ready(Option<Bytes>),
}

impl From<Bytes> for SlowBody {
    fn from(b: Bytes) -> Self {
        Self::Ready(Some(b))
    }
}

impl Body for SlowBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Chan(rx, _, _) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
            Self::Ready(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Chan(_, n, true) => SizeHint::with_exact(*n),
            Self::Chan(_, _, false) => SizeHint::default(),
            Self::Ready(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Ready(None) => SizeHint::with_exact(0),
        }
    }
}

fn counting() -> (
    impl Service<
            Request<SlowBody>,
            Response = Response<Full<Bytes>>,
            Error = BoxError,
            Future = impl Send,
        > + Clone,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = tower::service_fn(move |req: Request<SlowBody>| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            let _ = http_body_util::BodyExt::collect(req.into_body()).await;
            Ok::<_, BoxError>(status(503))
        }
    });
    (svc, calls)
}

#[tokio::test(start_paused = true)]
async fn dropped_while_the_body_is_read_for_replay_sends_nothing() {
    let (svc, calls) = counting();
    let (tx, rx) = mpsc::channel(4);
    let r = Request::post(URL)
        .header("idempotency-key", "k-body")
        .body(SlowBody::Chan(rx, 10, true))
        .unwrap();
    let task = tokio::spawn(RetryLayer::new().layer(svc).oneshot(r));
    tx.send(Bytes::from_static(b"hello")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    task.abort();
    let _ = task.await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 0, "a half-read body was sent");
}

#[tokio::test(start_paused = true)]
async fn an_unbounded_stream_is_sent_once() {
    let (svc, calls) = counting();
    let (tx, rx) = mpsc::channel(4);
    let r = Request::put(URL)
        .body(SlowBody::Chan(rx, 0, false))
        .unwrap();
    let task = tokio::spawn(
        RetryLayer::new()
            .with_backoff(
                Backoff::exponential(Duration::from_millis(1), Duration::from_millis(1)).unwrap(),
            )
            .layer(svc)
            .oneshot(r),
    );
    tx.send(Bytes::from_static(b"abc")).await.unwrap();
    drop(tx);
    let res = task.await.unwrap().unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
