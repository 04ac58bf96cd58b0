//! Third-round outside tests of coalescing, hedging and the adaptive concurrency limit
//! (docs/guides/coalesce.md, hedge.md, concurrency.md), in process on paused time.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, Algorithm};
use sturdy::core::BoxError;
use sturdy::hedge::HedgeLayer;
use tower::{service_fn, Layer, Service, ServiceExt};

const U: &str = "http://api.example.com/items";
const H: &str = "api.example.com";

type B = BoxBody<Bytes, BoxError>;

fn get() -> Request<Full<Bytes>> {
    Request::get(U).body(Full::new(Bytes::new())).unwrap()
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// An upstream that takes `delay`, then streams `chunks` chunks of `size` bytes, counting the
/// calls and the chunks it hands out.
#[derive(Clone)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    chunks_read: Arc<AtomicUsize>,
    delay: Duration,
    chunks: usize,
    size: usize,
}

impl Upstream {
    fn new(delay: Duration, chunks: usize, size: usize) -> Self {
        Self {
            calls: Arc::new(AtomicUsize::new(0)),
            chunks_read: Arc::new(AtomicUsize::new(0)),
            delay,
            chunks,
            size,
        }
    }

    fn service(
        &self,
    ) -> tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<B>, BoxError> {
        let me = self.clone();
        tower::util::BoxCloneSyncService::new(service_fn(move |_req: Request<Full<Bytes>>| {
            let me = me.clone();
            async move {
                me.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(me.delay).await;
                let read = me.chunks_read.clone();
                let size = me.size;
                let s = futures_util::stream::iter(0..me.chunks).map(move |i| {
                    read.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(vec![
                        b'a' + (i % 26)
                            as u8;
                        size
                    ])))
                });
                Ok::<_, BoxError>(Response::new(BodyExt::boxed(StreamBody::new(s))))
            }
        }))
    }
}

async fn body_of<Bd: http_body::Body>(r: Response<Bd>) -> Bytes
where
    Bd::Error: std::fmt::Debug,
{
    r.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test(start_paused = true)]
async fn coalesce_the_leader_leaving_does_not_cancel_the_others_and_the_body_is_read_once() {
    let up = Upstream::new(Duration::from_secs(1), 4, 1000);
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(up.service());
    let leader = tokio::spawn(svc.clone().oneshot(get()));
    settle().await;
    let followers: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    settle().await;
    leader.abort();
    let mut bodies = Vec::new();
    for f in followers {
        let r = tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("no hang")
            .unwrap()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        bodies.push(body_of(r).await);
    }
    assert!(bodies.iter().all(|b| b.len() == 4000 && b == &bodies[0]));
    assert_eq!(up.calls.load(Ordering::SeqCst), 1, "one upstream call");
    assert_eq!(
        up.chunks_read.load(Ordering::SeqCst),
        4,
        "the body read once"
    );
    let st = handle.stats();
    assert_eq!(st.upstream(), 1);
}

#[tokio::test(start_paused = true)]
async fn coalesce_a_leader_gone_with_a_large_body_hands_it_to_the_first_other_caller() {
    // 4 chunks of 1000 bytes, bound 1500: not shared.
    let up = Upstream::new(Duration::from_secs(1), 4, 1000);
    let (layer, handle) = CoalesceLayer::new().with_max_body(1500).pair();
    let svc = layer.layer(up.service());
    let leader = tokio::spawn(svc.clone().oneshot(get()));
    settle().await;
    let followers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    settle().await;
    leader.abort();
    for f in followers {
        let r = tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("no hang")
            .unwrap()
            .unwrap();
        assert_eq!(
            body_of(r).await.len(),
            4000,
            "every caller gets the whole body"
        );
    }
    // One call taken over by the first follower, the two others on their own.
    assert_eq!(
        up.calls.load(Ordering::SeqCst),
        3,
        "stats: {:?}",
        handle.stats()
    );
}

#[tokio::test(start_paused = true)]
async fn coalesce_over_buffer_one_and_concurrency_limit_one_with_kept_services_does_not_deadlock() {
    let up = Upstream::new(Duration::from_millis(100), 1, 10);
    let inner = tower::buffer::Buffer::new(tower::limit::ConcurrencyLimit::new(up.service(), 1), 1);
    let svc = CoalesceLayer::new().layer(inner);
    let run = async {
        let calls = (0..20).map(|i| {
            let mut s = svc.clone();
            async move {
                // A kept service: made ready, then called (odd ones after a pause).
                let ready = s.ready().await.unwrap();
                if i % 2 == 1 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                let r = ready.call(get()).await.unwrap();
                body_of(r).await
            }
        });
        for b in futures_util::future::join_all(calls).await {
            assert_eq!(b.len(), 10);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("deadlock under Buffer(1)/ConcurrencyLimit(1)");
    assert!(up.calls.load(Ordering::SeqCst) <= 20);
}

#[tokio::test(start_paused = true)]
async fn coalesce_shared_error_reaches_every_caller_and_nobody_hangs() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let inner = service_fn(move |_r: Request<Full<Bytes>>| {
        let c = c2.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err::<Response<Full<Bytes>>, BoxError>("upstream exploded".into())
        }
    });
    let svc = CoalesceLayer::new().layer(inner);
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for t in tasks {
        let e = t.await.unwrap().unwrap_err();
        let chain = format!("{e}");
        assert!(chain.contains("upstream exploded"), "{chain}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn adaptive_limit_stays_within_bounds_under_hostile_latency_and_overload() {
    for algorithm in [Algorithm::Aimd, Algorithm::Vegas] {
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        // Latency from 0 to 10 minutes; every third call a 503.
        let inner = service_fn(move |_r: Request<Full<Bytes>>| {
            let i = n2.fetch_add(1, Ordering::SeqCst);
            async move {
                let ms = [0u64, 1, 600_000, 5, 0, 120_000, 3][i % 7];
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let status = if i.is_multiple_of(3) { 503 } else { 200 };
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
            }
        });
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_algorithm(algorithm)
            .with_limits(2, 6)
            .with_initial_limit(50)
            .with_max_wait(Duration::from_secs(3600))
            .pair();
        let svc = layer.layer(inner);
        let mut peak = 0;
        let mut tasks = Vec::new();
        for _ in 0..200 {
            tasks.push(tokio::spawn(svc.clone().oneshot(get())));
        }
        for _ in 0..400 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            if let Some(st) = handle.state(H) {
                assert!(
                    (2..=6).contains(&st.limit()),
                    "{algorithm:?}: limit {} outside 2..=6",
                    st.limit()
                );
                peak = peak.max(st.in_flight());
            }
        }
        for t in tasks {
            let _ = t.await.unwrap();
        }
        assert!(
            peak <= 6,
            "{algorithm:?}: {peak} in flight with a maximum of 6"
        );
        let l = handle.limit(H).unwrap();
        assert!((2..=6).contains(&l), "{algorithm:?}: final limit {l}");
    }
}

#[tokio::test(start_paused = true)]
async fn adaptive_zero_limits_are_taken_as_one() {
    let inner = service_fn(|_r: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(0, 0)
        .with_initial_limit(0)
        .pair();
    let svc = layer.layer(inner);
    let run = async {
        let tasks: Vec<_> = (0..5)
            .map(|_| tokio::spawn(svc.clone().oneshot(get())))
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("no hang with limits (0, 0)");
    assert_eq!(handle.limit(H), Some(1));
    handle.set_limit(H, 0);
    assert_eq!(
        handle.limit(H),
        Some(1),
        "set_limit(0) is taken as the minimum"
    );
    handle.set_limit(H, 1_000_000);
    assert_eq!(
        handle.limit(H),
        Some(1),
        "set_limit above the maximum is capped"
    );
}

#[tokio::test(start_paused = true)]
async fn hedge_delay_is_capped_under_hostile_latency() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let inner = service_fn(move |_r: Request<Full<Bytes>>| {
        n2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    });
    let (layer, handle) = HedgeLayer::new().with_min_samples(10).pair();
    let svc = layer.layer(inner);
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let st = handle.stats(H).expect("stats for the host");
    let d = st.delay().expect("a delay after 20 samples");
    assert!(
        d <= Duration::from_secs(10),
        "delay {d:?} beyond the 10 s maximum"
    );
    assert!(d >= Duration::from_millis(1));
}

#[tokio::test(start_paused = true)]
async fn coalesce_every_caller_gets_the_trailers() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let inner = service_fn(move |_r: Request<Full<Bytes>>| {
        c2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut t = http::HeaderMap::new();
            t.insert("x-checksum", http::HeaderValue::from_static("abc"));
            let frames = vec![
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"payload"))),
                Ok(http_body::Frame::trailers(t)),
            ];
            Ok::<_, Infallible>(Response::new(StreamBody::new(futures_util::stream::iter(
                frames,
            ))))
        }
    });
    let svc = CoalesceLayer::new().layer(inner);
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        let c = r.into_body().collect().await.unwrap();
        assert_eq!(
            c.trailers().and_then(|t| t.get("x-checksum")).unwrap(),
            "abc"
        );
        assert_eq!(c.to_bytes(), "payload");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn adaptive_dropped_calls_and_waiters_give_everything_back() {
    let inner = service_fn(|_r: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(3, 3)
        .with_initial_limit(3)
        .pair();
    let svc = layer.layer(inner);
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    settle().await;
    let st = handle.state(H).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (3, 7));
    for t in &tasks {
        t.abort();
    }
    settle().await;
    let st = handle.state(H).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0), "permits leaked");
    assert_eq!(st.limit(), 3, "dropped calls say nothing about capacity");
}

#[tokio::test(start_paused = true)]
async fn hedge_over_a_concurrency_limit_of_one_does_not_deadlock() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let inner = service_fn(move |_r: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            // Fast while warming, then one slow call.
            let d = if i < 20 { 10 } else { 2_000 };
            tokio::time::sleep(Duration::from_millis(d)).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(i.to_string()))))
        }
    });
    let (layer, handle) = HedgeLayer::new().with_min_samples(10).pair();
    let mut svc = layer.layer(tower::limit::ConcurrencyLimit::new(inner, 1));
    let run = async {
        for _ in 0..20 {
            svc.ready().await.unwrap().call(get()).await.unwrap();
        }
        let r = svc.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("deadlock: hedge under ConcurrencyLimit(1)");
    eprintln!("hedge stats: {:?}", handle.stats(H));
}

fn host_echo(
    calls: Arc<AtomicUsize>,
    delay: Duration,
) -> tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError> {
    tower::util::BoxCloneSyncService::new(service_fn(move |r: Request<Full<Bytes>>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(delay).await;
            let body = format!("{} {}", r.method(), r.uri().host().unwrap_or("-"));
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(body))))
        }
    }))
}

#[tokio::test(start_paused = true)]
async fn coalesce_never_mixes_hosts_or_methods_past_its_host_bound() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = CoalesceLayer::new()
        .with_max_hosts(1)
        .layer(host_echo(calls.clone(), Duration::from_millis(100)));
    let mk = |m: &str, host: &str| {
        Request::builder()
            .method(m)
            .uri(format!("http://{host}/same/path"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let cases = [
        ("GET", "a.example"),
        ("GET", "b.example"),
        ("HEAD", "a.example"),
        ("GET", "c.example"),
        ("GET", "a.example"),
    ];
    let tasks: Vec<_> = cases
        .iter()
        .map(|(m, h)| tokio::spawn(svc.clone().oneshot(mk(m, h))))
        .collect();
    for ((m, h), t) in cases.iter().zip(tasks) {
        let r = t.await.unwrap().unwrap();
        let b = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            b,
            format!("{m} {h}"),
            "a caller got another request's response"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn adaptive_one_busy_host_does_not_hold_up_another_past_the_host_bound() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, _handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .with_max_hosts(1)
        .pair();
    let svc = layer.layer(host_echo(calls.clone(), Duration::from_secs(60)));
    let a = |h: &str| {
        Request::get(format!("http://{h}/x"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let _busy = tokio::spawn(svc.clone().oneshot(a("a.example")));
    settle().await;
    // a.example's call has 30 s to go; b.example's own call takes 60 s.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let start = tokio::time::Instant::now();
    let r = svc.clone().oneshot(a("b.example")).await.unwrap();
    let b = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(b, "GET b.example");
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(60),
        "b.example waited for a.example's place"
    );
}
