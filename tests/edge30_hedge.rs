//! `HedgeLayer` on paused time against in-process services (docs/guides/hedge.md, the crate
//! docs): which calls are hedged, when, within which budget, which copy wins, what is dropped.
#![cfg(feature = "full")]

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use sturdy::core::ErrorKind;
use sturdy::hedge::{HedgeHandle, HedgeLayer};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::edge30_util::DropGuard;

const HOST: &str = "api.example.com";

/// What each invocation of the service does: by its 0-based index, a latency and whether it
/// fails (with which io error kind).
type Plan = Arc<Mutex<Box<dyn Fn(usize) -> (Duration, Option<io::ErrorKind>) + Send>>>;

#[derive(Clone)]
struct Api {
    invoked: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    plan: Plan,
}

impl Api {
    fn new() -> Self {
        Self {
            invoked: Arc::new(AtomicUsize::new(0)),
            dropped: Arc::new(AtomicUsize::new(0)),
            plan: Arc::new(Mutex::new(Box::new(|_| (Duration::from_millis(10), None)))),
        }
    }
    fn set(&self, f: impl Fn(usize) -> (Duration, Option<io::ErrorKind>) + Send + 'static) {
        *self.plan.lock().unwrap() = Box::new(f);
    }
    fn invoked(&self) -> usize {
        self.invoked.load(Ordering::SeqCst)
    }
    fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
    fn service(
        &self,
    ) -> impl Service<
        Request<()>,
        Response = Response<()>,
        Error = io::Error,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + Sync
           + 'static {
        let me = self.clone();
        tower::service_fn(move |_req: Request<()>| {
            let i = me.invoked.fetch_add(1, Ordering::SeqCst);
            let (d, fail) = (me.plan.lock().unwrap())(i);
            let dropped = me.dropped.clone();
            async move {
                let mut g = DropGuard(dropped, false);
                tokio::time::sleep(d).await;
                g.1 = true;
                match fail {
                    Some(k) => Err(io::Error::new(k, format!("{k:?}"))),
                    None => Ok(Response::new(())),
                }
            }
        })
    }
}

fn req(m: Method) -> Request<()> {
    Request::builder()
        .method(m)
        .uri(format!("http://{HOST}/orders/1"))
        .body(())
        .unwrap()
}

async fn warm<S>(svc: &S, n: usize)
where
    S: Service<Request<()>, Response = Response<()>> + Clone,
    S::Error: std::fmt::Debug,
{
    for _ in 0..n {
        svc.clone().oneshot(req(Method::GET)).await.unwrap();
    }
}

fn stats(h: &HedgeHandle) -> sturdy::hedge::HedgeStats {
    h.stats(HOST).expect("the host has state")
}

#[test]
fn shared_types_are_send_sync_clone() {
    fn ssc<T: Send + Sync + Clone + 'static>() {}
    ssc::<HedgeLayer>();
    ssc::<HedgeHandle>();
}

#[tokio::test(start_paused = true)]
async fn a_slow_get_is_hedged_after_p95_and_the_loser_is_dropped() {
    let api = Api::new();
    let (layer, h) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    warm(&svc, 150).await;
    let d = stats(&h).delay().expect("a delay after 150 samples");
    assert!(
        d >= Duration::from_millis(10) && d <= Duration::from_millis(12),
        "p95 of 10 ms, to the top of its 12.5 % bucket: {d:?}"
    );
    let first = api.invoked();
    api.set(move |i| {
        if i == first {
            (Duration::from_secs(5), None)
        } else {
            (Duration::from_millis(10), None)
        }
    });
    let t = Instant::now();
    svc.clone().oneshot(req(Method::GET)).await.unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_millis(25), "{took:?}");
    assert_eq!(api.invoked(), first + 2);
    assert_eq!(api.dropped(), 1, "the slow first copy was dropped");
    let s = stats(&h);
    assert_eq!((s.calls(), s.hedges(), s.hedge_wins()), (151, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn unsafe_methods_are_never_hedged() {
    let api = Api::new();
    let (layer, h) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    warm(&svc, 150).await;
    api.set(|_| (Duration::from_secs(2), None));
    for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        let before = api.invoked();
        let mut r = req(m.clone());
        r.headers_mut()
            .insert("idempotency-key", "k-1".parse().unwrap());
        svc.clone().oneshot(r).await.unwrap();
        svc.clone().oneshot(req(m.clone())).await.unwrap();
        assert_eq!(api.invoked(), before + 2, "{m}: sent once each");
    }
    let s = stats(&h);
    assert_eq!(s.hedges(), 0);
    assert_eq!(s.calls(), 150, "only hedgeable calls are counted");
    // HEAD and OPTIONS are hedged like GET.
    for m in [Method::HEAD, Method::OPTIONS] {
        let before = api.invoked();
        svc.clone().oneshot(req(m.clone())).await.unwrap();
        assert_eq!(api.invoked(), before + 2, "{m} is hedged");
    }
}

#[tokio::test(start_paused = true)]
async fn keyed_posts_are_hedged_only_when_allowed() {
    let api = Api::new();
    let (layer, h) = HedgeLayer::new().with_keyed_requests(true).pair();
    let svc = layer.layer(api.service());
    warm(&svc, 150).await;
    api.set(|_| (Duration::from_secs(1), None));
    let before = api.invoked();
    let mut r = req(Method::POST);
    r.headers_mut()
        .insert("idempotency-key", "k-1".parse().unwrap());
    svc.clone().oneshot(r).await.unwrap();
    assert_eq!(
        api.invoked(),
        before + 2,
        "a keyed POST is hedged when allowed"
    );
    // Without a key, never.
    let before = api.invoked();
    svc.clone().oneshot(req(Method::POST)).await.unwrap();
    assert_eq!(api.invoked(), before + 1);
    assert_eq!(stats(&h).hedges(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_blank_idempotency_key_does_not_make_a_post_hedgeable() {
    let api = Api::new();
    let (layer, h) = HedgeLayer::new().with_keyed_requests(true).pair();
    let svc = layer.layer(api.service());
    warm(&svc, 150).await;
    api.set(|_| (Duration::from_secs(1), None));
    for blank in ["", " ", "\t"] {
        let before = api.invoked();
        let mut r = req(Method::POST);
        r.headers_mut()
            .insert("idempotency-key", blank.parse().unwrap());
        svc.clone().oneshot(r).await.unwrap();
        assert_eq!(api.invoked(), before + 1, "{blank:?}: sent once");
    }
    assert_eq!(stats(&h).hedges(), 0);
}

#[tokio::test(start_paused = true)]
async fn cancelling_the_caller_drops_both_copies() {
    let api = Api::new();
    let (layer, h) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    warm(&svc, 150).await;
    api.set(|_| (Duration::from_secs(10), None));
    let before = api.invoked();
    let r = tokio::time::timeout(
        Duration::from_millis(100),
        svc.clone().oneshot(req(Method::GET)),
    )
    .await;
    assert!(r.is_err());
    assert_eq!(api.invoked(), before + 2, "both copies were sent");
    assert_eq!(api.dropped(), 2, "and both were dropped with the call");
    assert_eq!(stats(&h).hedges(), 1);
    // An aborted task too.
    let before = api.invoked();
    let t = tokio::spawn(svc.clone().oneshot(req(Method::GET)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.abort();
    let _ = t.await;
    tokio::task::yield_now().await;
    assert_eq!(api.invoked(), before + 2);
    assert_eq!(api.dropped(), 4);
}

#[tokio::test(start_paused = true)]
async fn the_budget_caps_hedges_at_burst_plus_ratio() {
    let api = Api::new();
    let (layer, h) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    warm(&svc, 500).await;
    api.set(|_| (Duration::from_millis(50), None));
    for _ in 0..20 {
        svc.clone().oneshot(req(Method::GET)).await.unwrap();
    }
    let s = stats(&h);
    assert_eq!(
        s.hedges(),
        10,
        "a full budget of 10, then 0.05 a call: {s:?}"
    );
    // And in general: hedges <= 5 % of calls + 10.
    for _ in 0..200 {
        svc.clone().oneshot(req(Method::GET)).await.unwrap();
    }
    let s = stats(&h);
    assert!(s.hedges() as f64 <= 0.05 * s.calls() as f64 + 10.0, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn nothing_is_hedged_before_min_samples() {
    let api = Api::new();
    let (layer, h) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    warm(&svc, 99).await;
    assert_eq!(stats(&h).delay(), None);
    api.set(|_| (Duration::from_secs(1), None));
    let before = api.invoked();
    svc.clone().oneshot(req(Method::GET)).await.unwrap();
    assert_eq!(api.invoked(), before + 1);
    assert_eq!(stats(&h).hedges(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_first_copy_that_fails_before_the_hedge_fails_the_call() {
    let api = Api::new();
    let (layer, _h) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    warm(&svc, 150).await;
    api.set(|_| {
        (
            Duration::from_millis(2),
            Some(io::ErrorKind::ConnectionRefused),
        )
    });
    let before = api.invoked();
    let t = Instant::now();
    let err = svc.clone().oneshot(req(Method::GET)).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_millis(5));
    assert_eq!(api.invoked(), before + 1);
    // Returned as it is, boxed.
    let io = err
        .downcast_ref::<io::Error>()
        .expect("the inner error as it is");
    assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused);
}

#[tokio::test(start_paused = true)]
async fn both_fail_never_reports_not_sent_when_one_may_have_been_processed() {
    let api = Api::new();
    let (layer, _h) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    warm(&svc, 150).await;
    // The first copy fails last, refused; the hedge fails first, reset after it was written.
    let first = api.invoked();
    api.set(move |i| {
        if i == first {
            (
                Duration::from_millis(50),
                Some(io::ErrorKind::ConnectionRefused),
            )
        } else {
            (
                Duration::from_millis(5),
                Some(io::ErrorKind::ConnectionReset),
            )
        }
    });
    let err = svc.clone().oneshot(req(Method::GET)).await.unwrap_err();
    assert_eq!(api.invoked(), first + 2);
    let io = sturdy::core::find::<io::Error>(&*err).unwrap();
    assert_eq!(io.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert_ne!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent
    );
    // Otherwise: the later error.
    let first = api.invoked();
    api.set(move |i| {
        if i == first {
            (
                Duration::from_millis(50),
                Some(io::ErrorKind::ConnectionReset),
            )
        } else {
            (Duration::from_millis(5), Some(io::ErrorKind::TimedOut))
        }
    });
    let err = svc.clone().oneshot(req(Method::GET)).await.unwrap_err();
    let io = sturdy::core::find::<io::Error>(&*err).unwrap();
    assert_eq!(
        io.kind(),
        io::ErrorKind::ConnectionReset,
        "the later error: {err}"
    );
}

#[tokio::test(start_paused = true)]
async fn one_copy_fails_the_call_waits_for_the_other() {
    let api = Api::new();
    let (layer, _h) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    warm(&svc, 150).await;
    let first = api.invoked();
    api.set(move |i| {
        if i == first {
            (Duration::from_millis(100), None)
        } else {
            (
                Duration::from_millis(1),
                Some(io::ErrorKind::ConnectionReset),
            )
        }
    });
    let t = Instant::now();
    svc.clone().oneshot(req(Method::GET)).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(100));
}

#[test]
fn settings_are_validated_and_errors_name_the_setting() {
    for p in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        let err = HedgeLayer::new()
            .with_percentile(p)
            .expect_err(&format!("{p} must be refused"));
        assert_eq!(*err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("percentile"), "{err}");
    }
    assert!(HedgeLayer::new().with_percentile(0.5).is_ok());
    for r in [-0.01, 1.01, f64::NAN, f64::INFINITY] {
        let err = HedgeLayer::new()
            .with_budget(r, 10)
            .expect_err(&format!("{r} must be refused"));
        assert_eq!(*err.kind(), ErrorKind::Config);
        let msg = err.to_string();
        assert!(msg.contains("ratio") || msg.contains("budget"), "{msg}");
    }
    assert!(HedgeLayer::new().with_budget(0.0, 0).is_ok());
    assert!(HedgeLayer::new().with_budget(1.0, u32::MAX).is_ok());
}

#[tokio::test(start_paused = true)]
async fn delay_bounds_hold_and_max_below_min_is_min() {
    let api = Api::new();
    api.set(|_| (Duration::from_micros(100), None));
    let (layer, h) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    warm(&svc, 150).await;
    let d = stats(&h).delay().unwrap();
    assert!(
        d >= Duration::from_millis(1) && d < Duration::from_millis(2),
        "never below 1 ms: {d:?}"
    );

    let api = Api::new();
    api.set(|_| (Duration::from_secs(60), None));
    let (layer, h) = HedgeLayer::new()
        .with_window(Duration::from_secs(100_000))
        .pair();
    let svc = layer.layer(api.service());
    warm(&svc, 110).await;
    assert_eq!(
        stats(&h).delay(),
        Some(Duration::from_secs(10)),
        "never above 10 s"
    );

    let api = Api::new();
    let (layer, h) = HedgeLayer::new()
        .with_delay_bounds(Duration::from_millis(5), Duration::from_millis(2))
        .pair();
    let svc = layer.layer(api.service());
    api.set(|_| (Duration::from_micros(100), None));
    warm(&svc, 150).await;
    assert_eq!(stats(&h).delay(), Some(Duration::from_millis(5)));
}

#[tokio::test(start_paused = true)]
async fn over_concurrency_limit_one_the_first_answer_wins() {
    let api = Api::new();
    let (layer, h) = HedgeLayer::new().pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(api.service());
    warm(&svc, 150).await;
    api.set(|_| (Duration::from_millis(300), None));
    let before = api.invoked();
    let t = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(5),
        svc.clone().oneshot(req(Method::GET)),
    )
    .await
    .expect("no deadlock")
    .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(api.invoked(), before + 1, "the hedge never got a permit");
    // The next call is not held by a leftover copy.
    api.set(|_| (Duration::from_millis(10), None));
    let t = Instant::now();
    svc.clone().oneshot(req(Method::GET)).await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    let _ = h;
}

#[tokio::test(start_paused = true)]
async fn kept_service_under_buffer_from_many_tasks() {
    let api = Api::new();
    let (layer, h) = HedgeLayer::new().pair();
    let svc = ServiceBuilder::new()
        .buffer(64)
        .layer(layer)
        .service(api.service());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..40 {
                let f = s.ready().await.unwrap().call(req(Method::GET));
                f.await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = stats(&h);
    assert_eq!(s.calls(), 320);
    assert!(s.hedges() as f64 <= 0.05 * 320.0 + 10.0);
    assert_eq!(api.invoked() as u64, 320 + s.hedges());
}
