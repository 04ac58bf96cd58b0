#![cfg(feature = "full")]
//! Outside round s110: hedging (`sturdy::hedge`), coalescing (`sturdy::coalesce`) and their
//! metrics and events (`sturdy::core::events`), read from docs/guides/hedge.md, coalesce.md,
//! metrics.md and the public rustdoc. Covers: coalescing over hedging (one upstream call, one
//! hedge, every event and metric with its labels), hedges refused by a breaker or a rate limiter
//! below, losers and timed-out calls not counted by a breaker, the order and timing of hedge
//! events, a too-large shared body whose leader left, shared errors and failing shared bodies,
//! header order in the identity of a request, relative URIs and their labels, and the host
//! bound of the coalescing tables. Paused time against in-process services.

use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::{CoalesceLayer, SharedError};
use sturdy::core::events::Event;
use sturdy::core::BoxError;
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

type Body = BoxBody<Bytes, BoxError>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

fn full(s: &'static str) -> Body {
    Full::new(Bytes::from_static(s.as_bytes()))
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// A body that yields each chunk after its delay; `Err(())` is an I/O error.
fn chunked(chunks: Vec<(u64, Result<&'static str, ()>)>) -> Body {
    let s = futures_util::stream::iter(chunks).then(|(d, c)| async move {
        tokio::time::sleep(ms(d)).await;
        match c {
            Ok(s) => Ok(Frame::data(Bytes::from_static(s.as_bytes()))),
            Err(()) => Err::<_, BoxError>(Box::new(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "reset mid-body",
            ))),
        }
    });
    BodyExt::boxed(StreamBody::new(s))
}

/// Every (name, sorted label pairs, value) recorded.
fn rows(snap: &Snapshotter) -> Vec<(String, Vec<(String, String)>, DebugValue)> {
    snap.snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, v)| {
            let key = k.key();
            let mut labels: Vec<_> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            (key.name().to_owned(), labels, v)
        })
        .collect()
}

fn counter(rows: &[(String, Vec<(String, String)>, DebugValue)], name: &str) -> u64 {
    rows.iter()
        .filter(|(n, _, _)| n == name)
        .map(|(_, _, v)| match v {
            DebugValue::Counter(c) => *c,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

fn labels_of(
    rows: &[(String, Vec<(String, String)>, DebugValue)],
    name: &str,
) -> Vec<Vec<(String, String)>> {
    rows.iter()
        .filter(|(n, _, _)| n == name)
        .map(|(_, l, _)| l.clone())
        .collect()
}

fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    v.sort();
    v
}

/// An API over `Request<Full<Bytes>>` whose n-th call (from 0, per path) sleeps as `script`
/// says; counts calls per path and calls dropped before they answered.
#[derive(Clone, Default)]
struct Api {
    calls: Arc<Mutex<Vec<String>>>,
    dropped: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
}

struct DropGuard(Arc<AtomicUsize>, bool);
impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Api {
    fn calls_to(&self, path: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.as_str() == path)
            .count()
    }

    /// `script(path, n)` gives the delay in ms of the n-th call to `path`.
    fn service(
        &self,
        script: impl Fn(&str, usize) -> u64 + Send + Sync + 'static,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + 'static {
        let api = self.clone();
        let script = Arc::new(script);
        service_fn(move |req: Request<Full<Bytes>>| {
            let path = req.uri().path().to_owned();
            let n = {
                let mut c = api.calls.lock().unwrap();
                let n = c.iter().filter(|p| **p == path).count();
                c.push(path.clone());
                n
            };
            let wait = script(&path, n);
            let mut guard = DropGuard(api.dropped.clone(), false);
            let answered = api.answered.clone();
            async move {
                tokio::time::sleep(ms(wait)).await;
                guard.1 = true;
                drop(guard);
                answered.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(Response::new(Full::from(format!("{path}#{n}"))))
            }
        })
    }
}

/// Ten answered GETs of 10 ms to `host`, so that a layer with `with_min_samples(10)` has a
/// delay (the top of the 10 ms bucket).
async fn warm<S>(svc: &mut S, host: &str)
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    for i in 0..10 {
        let req = get(&format!("http://{host}/warm{i}"));
        svc.ready().await.unwrap().call(req).await.unwrap();
    }
}

type HedgeLog = Arc<Mutex<Vec<(&'static str, String, Option<String>, Duration)>>>;

fn hedge_log(start: Instant) -> (HedgeLog, impl Fn(&Event<'_>) + Send + Sync + 'static) {
    let log: HedgeLog = Arc::default();
    let l2 = log.clone();
    let f = move |e: &Event<'_>| match e {
        Event::HedgeSent { key, host, .. } => l2.lock().unwrap().push((
            "sent",
            key.to_string(),
            host.map(str::to_owned),
            start.elapsed(),
        )),
        Event::HedgeWon { key, host, .. } => l2.lock().unwrap().push((
            "won",
            key.to_string(),
            host.map(str::to_owned),
            start.elapsed(),
        )),
        _ => {}
    };
    (log, f)
}

type CoalesceLog = Arc<Mutex<Vec<(String, Option<String>, String)>>>;

fn coalesce_log() -> (CoalesceLog, impl Fn(&Event<'_>) + Send + Sync + 'static) {
    let log: CoalesceLog = Arc::default();
    let l2 = log.clone();
    let f = move |e: &Event<'_>| {
        if let Event::Coalesced {
            key, host, method, ..
        } = e
        {
            l2.lock()
                .unwrap()
                .push((key.to_string(), host.map(str::to_owned), method.to_string()));
        }
    };
    (log, f)
}

// ---------------------------------------------------------------------------------------------
// Coalescing over hedging: one upstream call, one hedge, every event and metric.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_coalesced_burst_over_hedging_is_one_call_one_hedge_with_bounded_labels() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _g = metrics::set_default_local_recorder(&recorder);

    let api = Api::default();
    // The first copy of /orders stalls for 10 s; any other call answers in 10 ms.
    let inner = api.service(|path, n| {
        if path == "/orders" && n == 0 {
            10_000
        } else {
            10
        }
    });
    let start = Instant::now();
    let (hlog, hf) = hedge_log(start);
    let (clog, cf) = coalesce_log();
    let (hedge, hh) = HedgeLayer::new().with_min_samples(10).on_event(hf).pair();
    let (coalesce, ch) = CoalesceLayer::new().on_event(cf).pair();
    let mut svc = ServiceBuilder::new()
        .layer(coalesce)
        .layer(hedge)
        .service(inner);
    warm(&mut svc, "api.example.com:8080").await;
    assert!(hh.stats("api.example.com:8080").unwrap().delay().is_some());
    hlog.lock().unwrap().clear();

    let t0 = Instant::now();
    let uri = "http://API.Example.COM:8080/orders?token=s3cret";
    let calls = (0..5).map(|_| svc.clone().oneshot(get(uri)));
    let out = join_all(calls).await;
    let took = t0.elapsed();
    for r in out {
        let res = r.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "/orders#1", "every caller gets the hedge's answer");
    }
    assert!(took < ms(100), "answered by the hedge, took {took:?}");
    assert_eq!(api.calls_to("/orders"), 2, "one shared call, hedged once");
    assert_eq!(
        api.dropped.load(Ordering::SeqCst),
        1,
        "the stalled copy is cancelled"
    );

    let st = ch.stats();
    assert_eq!((st.upstream() - 10, st.joined()), (1, 4));
    let hs = hh.stats("API.EXAMPLE.com:8080").unwrap();
    assert_eq!((hs.calls(), hs.hedges(), hs.hedge_wins()), (11, 1, 1));

    let hl = hlog.lock().unwrap().clone();
    let kinds: Vec<_> = hl.iter().map(|e| e.0).collect();
    assert_eq!(kinds, ["sent", "won"]);
    for (_, key, host, _) in &hl {
        assert_eq!(key, "api.example.com:8080");
        assert_eq!(host.as_deref(), Some("api.example.com:8080"));
    }
    let cl = clog.lock().unwrap().clone();
    assert_eq!(cl.len(), 4, "{cl:?}");
    for (key, host, method) in &cl {
        assert_eq!(key, "api.example.com:8080");
        assert!(host
            .as_deref()
            .unwrap()
            .eq_ignore_ascii_case("api.example.com:8080"));
        assert_eq!(method, "GET");
    }

    let r = rows(&snap);
    let server = l(&[
        ("server.address", "api.example.com"),
        ("server.port", "8080"),
    ]);
    assert_eq!(counter(&r, "sturdy.hedge.sent"), 1);
    assert_eq!(counter(&r, "sturdy.hedge.won"), 1);
    assert_eq!(counter(&r, "sturdy.coalesce.coalesced"), 4);
    assert_eq!(labels_of(&r, "sturdy.hedge.sent"), vec![server.clone()]);
    assert_eq!(labels_of(&r, "sturdy.hedge.won"), vec![server]);
    assert_eq!(
        labels_of(&r, "sturdy.coalesce.coalesced"),
        [l(&[
            ("http.request.method", "GET"),
            ("server.address", "api.example.com"),
            ("server.port", "8080")
        ])]
    );
    for (name, labels, _) in &r {
        for (k, v) in labels {
            assert!(
                !v.contains("s3cret") && !v.contains('/') && !v.contains("Example"),
                "{name}: {k}={v}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hedge events fire when the guide says: the send at the delay, the win at the answer.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_hedge_sent_fires_at_the_delay_and_won_at_the_copys_answer_each_once() {
    let api = Api::default();
    let inner = api.service(|path, n| match (path, n) {
        ("/slow", 0) => 1_000,
        ("/slow", _) => 30,
        _ => 10,
    });
    let start = Instant::now();
    let (hlog, hf) = hedge_log(start);
    let (hedge, hh) = HedgeLayer::new().with_min_samples(10).on_event(hf).pair();
    let mut svc = hedge.layer(inner);
    warm(&mut svc, "api.example.com").await;
    let delay = hh.stats("api.example.com").unwrap().delay().unwrap();
    assert!(delay >= ms(10) && delay <= ms(12), "{delay:?}");
    hlog.lock().unwrap().clear();

    let t0 = start.elapsed();
    let fut = svc
        .ready()
        .await
        .unwrap()
        .call(get("http://api.example.com/slow"));
    let task = tokio::spawn(fut);
    tokio::time::sleep(delay - ms(1)).await;
    assert!(hlog.lock().unwrap().is_empty(), "nothing before the delay");
    tokio::time::sleep(ms(2)).await;
    {
        let hl = hlog.lock().unwrap();
        assert_eq!(hl.len(), 1, "{hl:?}");
        assert_eq!(hl[0].0, "sent");
        let at = hl[0].3 - t0;
        assert!(at >= delay && at <= delay + ms(1), "sent at {at:?}");
    }
    tokio::time::sleep(ms(27)).await;
    assert_eq!(
        hlog.lock().unwrap().len(),
        1,
        "the copy has not answered yet"
    );
    let res = task.await.unwrap().unwrap();
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "/slow#1"
    );
    let hl = hlog.lock().unwrap().clone();
    assert_eq!(hl.len(), 2, "{hl:?}");
    assert_eq!(hl[1].0, "won");
    let won_at = hl[1].3 - t0;
    assert!(
        won_at >= delay + ms(30) && won_at <= delay + ms(32),
        "won at {won_at:?}"
    );
    assert_eq!(api.dropped.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Hedges under a breaker and a rate limit below.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_losers_and_timed_out_hedged_calls_are_not_breaker_failures_kept_service() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _g = metrics::set_default_local_recorder(&recorder);

    let api = Api::default();
    // /tail: the first copy of each call stalls (even calls), the hedge answers in 10 ms.
    // /stall: every copy stalls for 10 s.
    let inner = api.service(|path, n| match path {
        "/tail" if n % 2 == 0 => 10_000,
        "/stall" => 10_000,
        _ => 10,
    });
    let (breaker, bh) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let (hedge, hh) = HedgeLayer::new().with_min_samples(10).pair();
    let mut svc = ServiceBuilder::new()
        .timeout(ms(500))
        .layer(hedge)
        .layer(breaker)
        .service(inner);
    warm(&mut svc, "api.example.com").await;

    for _ in 0..5 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(get("http://api.example.com/tail"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(hh.stats("api.example.com").unwrap().hedge_wins(), 5);
    assert_eq!(
        api.dropped.load(Ordering::SeqCst),
        5,
        "each loser cancelled"
    );
    assert!(
        matches!(
            bh.state("api.example.com"),
            None | Some(CircuitState::Closed)
        ),
        "{:?}",
        bh.state("api.example.com")
    );

    for _ in 0..2 {
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(get("http://api.example.com/stall"))
            .await
            .unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    }
    assert_eq!(
        api.dropped.load(Ordering::SeqCst),
        9,
        "both copies of each timed-out call cancelled"
    );
    assert!(
        matches!(
            bh.state("api.example.com"),
            None | Some(CircuitState::Closed)
        ),
        "{:?}",
        bh.state("api.example.com")
    );
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(get("http://api.example.com/after"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let r = rows(&snap);
    assert_eq!(counter(&r, "sturdy.circuit.transitions"), 0, "{r:?}");
    assert_eq!(counter(&r, "sturdy.circuit.rejections"), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_a_hedge_refused_by_an_open_breaker_below_waits_for_the_first_copy() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _g = metrics::set_default_local_recorder(&recorder);

    let api = Api::default();
    let inner = api.service(|path, _| if path == "/slow" { 200 } else { 10 });
    let (breaker, bh) = CircuitBreakerLayer::new().pair();
    let (hedge, hh) = HedgeLayer::new().with_min_samples(10).pair();
    let mut svc = ServiceBuilder::new()
        .layer(hedge)
        .layer(breaker)
        .service(inner);
    warm(&mut svc, "api.example.com").await;

    let t0 = Instant::now();
    let fut = svc
        .ready()
        .await
        .unwrap()
        .call(get("http://api.example.com/slow"));
    let task = tokio::spawn(fut);
    tokio::time::sleep(ms(5)).await;
    bh.force_open("api.example.com");
    let res = task.await.unwrap().expect("the first copy's answer");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "/slow#0"
    );
    let took = t0.elapsed();
    assert!(took >= ms(200) && took < ms(205), "{took:?}");
    assert_eq!(
        api.calls_to("/slow"),
        1,
        "the refused hedge never reached the API"
    );
    let r = rows(&snap);
    assert_eq!(counter(&r, "sturdy.circuit.rejections"), 1, "{r:?}");
    assert_eq!(
        hh.stats("api.example.com").unwrap().hedge_wins(),
        0,
        "a refused hedge did not win"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_a_hedge_refused_by_the_rate_limiter_below_waits_for_the_first_copy() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _g = metrics::set_default_local_recorder(&recorder);

    let api = Api::default();
    let inner = api.service(|path, _| if path == "/slow" { 200 } else { 10 });
    // 11 slots: the 10 warm calls and the first copy; nothing is left for the hedge.
    let limit = RateLimitLayer::new(Quota::per_second(1).unwrap().with_burst(11).unwrap())
        .with_max_wait(Duration::ZERO);
    let (hedge, hh) = HedgeLayer::new().with_min_samples(10).pair();
    let mut svc = ServiceBuilder::new()
        .layer(hedge)
        .layer(limit)
        .service(inner);
    warm(&mut svc, "api.example.com").await;

    let t0 = Instant::now();
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(get("http://api.example.com/slow"))
        .await
        .expect("the first copy's answer, not the hedge's refusal");
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "/slow#0"
    );
    let took = t0.elapsed();
    assert!(took >= ms(200) && took < ms(205), "{took:?}");
    assert_eq!(api.calls_to("/slow"), 1);
    let r = rows(&snap);
    assert_eq!(counter(&r, "sturdy.ratelimit.refusals"), 1, "{r:?}");
    assert_eq!(
        labels_of(&r, "sturdy.ratelimit.refusals"),
        [l(&[("server.address", "api.example.com")])]
    );
    assert_eq!(hh.stats("api.example.com").unwrap().hedge_wins(), 0);
}

// ---------------------------------------------------------------------------------------------
// Coalescing corners.
// ---------------------------------------------------------------------------------------------

/// A coalescing API whose n-th call (from 0) answers as `script(n)` says.
#[allow(clippy::type_complexity)]
fn coalesce_api(
    script: impl Fn(usize) -> (u64, Body) + Send + Sync + 'static,
) -> (
    Arc<AtomicUsize>,
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Body>,
            Error = BoxError,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let script = Arc::new(script);
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        let (head, body) = script(i);
        async move {
            tokio::time::sleep(ms(head)).await;
            Ok::<_, BoxError>(Response::new(body))
        }
    });
    (n, svc)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_too_large_with_the_leader_gone_one_joiner_takes_it_the_other_sends_its_own() {
    let (n, inner) = coalesce_api(|i| {
        if i == 0 {
            (
                50,
                chunked(vec![(10, Ok("aaaa")), (10, Ok("bbbb")), (10, Ok("cccc"))]),
            )
        } else {
            (10, full("own"))
        }
    });
    let (layer, h) = CoalesceLayer::new().with_max_body(4).pair();
    let svc = layer.layer(inner);
    let uri = "http://api.example.com/big";
    let leader = tokio::spawn(svc.clone().oneshot(get(uri)));
    tokio::time::sleep(ms(5)).await;
    let j1 = tokio::spawn(svc.clone().oneshot(get(uri)));
    let j2 = tokio::spawn(svc.clone().oneshot(get(uri)));
    tokio::time::sleep(ms(15)).await;
    assert_eq!(h.stats().joined(), 2);
    leader.abort();
    let _ = leader.await;
    let mut bodies = Vec::new();
    for j in [j1, j2] {
        let res = tokio::time::timeout(ms(1_000), j)
            .await
            .expect("a joiner of a too-large call whose leader left is not stuck")
            .unwrap()
            .unwrap();
        let b = res.into_body().collect().await.unwrap().to_bytes();
        bodies.push(String::from_utf8(b.to_vec()).unwrap());
    }
    bodies.sort();
    assert_eq!(bodies, ["aaaabbbbcccc", "own"]);
    assert_eq!(
        n.load(Ordering::SeqCst),
        2,
        "one shared call and one of a joiner's own"
    );
    let st = h.stats();
    assert_eq!((st.upstream(), st.too_large(), st.fallbacks()), (1, 1, 1));
    assert_eq!(h.in_flight("api.example.com"), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_a_shared_error_has_the_documented_words_kind_and_cause_for_every_caller() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let inner = service_fn(move |_req: Request<Full<Bytes>>| {
        n2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(20)).await;
            Err::<Response<Full<Bytes>>, BoxError>(Box::new(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "peer reset",
            )))
        }
    });
    let original: BoxError = Box::new(io::Error::new(io::ErrorKind::ConnectionReset, "peer reset"));
    let want_kind = sturdy::core::classify::classify_error(&*original);
    let want_delivery = sturdy::core::classify::delivery(&*original);
    let (layer, h) = CoalesceLayer::new().pair();
    let svc = layer.layer(inner);
    let out = join_all((0..3).map(|_| svc.clone().oneshot(get("http://api.example.com/x")))).await;
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(h.stats().joined(), 2);
    for r in out {
        let err = r.unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("the call shared by identical requests in flight failed: "),
            "{text}"
        );
        assert!(text.contains("peer reset"), "{text}");
        assert!(sturdy::core::find::<SharedError>(&*err).is_some(), "{text}");
        assert_eq!(
            sturdy::core::find::<io::Error>(&*err).unwrap().kind(),
            io::ErrorKind::ConnectionReset
        );
        assert_eq!(
            format!("{:?}", sturdy::core::classify::classify_error(&*err)),
            format!("{want_kind:?}")
        );
        assert_eq!(sturdy::core::classify::delivery(&*err), want_delivery);
    }
    // Not a cache: the next identical request makes its own call.
    let _ = svc.clone().oneshot(get("http://api.example.com/x")).await;
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_a_shared_body_failing_midway_is_a_body_error_for_every_caller() {
    let (n, inner) = coalesce_api(|_| (10, chunked(vec![(5, Ok("abc")), (5, Err(()))])));
    let (layer, h) = CoalesceLayer::new().pair();
    let svc = layer.layer(inner);
    let out = join_all((0..3).map(|_| svc.clone().oneshot(get("http://api.example.com/b")))).await;
    assert_eq!(n.load(Ordering::SeqCst), 1);
    for r in out {
        let err = match r {
            Err(e) => e,
            Ok(res) => res
                .into_body()
                .collect()
                .await
                .map(|_| ())
                .expect_err("a body that failed cannot read whole"),
        };
        let kind = sturdy::core::classify::classify_error(&*err);
        assert_eq!(format!("{kind:?}"), "Body", "{err}");
    }
    assert_eq!(h.in_flight("api.example.com"), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_headers_in_another_order_across_names_join_values_in_another_order_do_not() {
    let (n, inner) = coalesce_api(|_| (20, full("ok")));
    let (layer, h) = CoalesceLayer::new().pair();
    let svc = layer.layer(inner);
    let mk = |pairs: &[(&str, &str)]| {
        let mut b = Request::get("http://api.example.com/h");
        for (k, v) in pairs {
            b = b.header(*k, *v);
        }
        b.body(Full::default()).unwrap()
    };
    let reqs = vec![
        mk(&[("x-a", "1"), ("x-b", "2"), ("x-request-id", "r1")]),
        mk(&[("x-b", "2"), ("x-a", "1"), ("x-request-id", "r2")]),
        mk(&[("accept", "a"), ("accept", "b")]),
        mk(&[("accept", "b"), ("accept", "a")]),
        mk(&[("x-a", "1"), ("x-b", "2"), ("traceparent", "t")]),
    ];
    let out = join_all(reqs.into_iter().map(|r| svc.clone().oneshot(r))).await;
    for r in out {
        assert_eq!(r.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        n.load(Ordering::SeqCst),
        3,
        "x-a/x-b in any order share one call; accept a,b and b,a are two"
    );
    assert_eq!(h.stats().joined(), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_relative_uris_are_labelled_by_their_host_header_in_lower_case() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _g = metrics::set_default_local_recorder(&recorder);
    let (n, inner) = coalesce_api(|_| (20, full("ok")));
    let (clog, cf) = coalesce_log();
    let (layer, h) = CoalesceLayer::new().on_event(cf).pair();
    let svc = layer.layer(inner);
    let mk = || {
        Request::head("/items?api_key=s3cret")
            .header("host", "API.Example.com:8080")
            .body(Full::default())
            .unwrap()
    };
    let out = join_all((0..3).map(|_| svc.clone().oneshot(mk()))).await;
    for r in out {
        assert_eq!(r.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(h.stats().joined(), 2);
    let cl = clog.lock().unwrap().clone();
    assert_eq!(cl.len(), 2);
    for (key, host, method) in &cl {
        assert_eq!(key, "api.example.com:8080");
        assert!(host
            .as_deref()
            .unwrap()
            .eq_ignore_ascii_case("api.example.com:8080"));
        assert_eq!(method, "HEAD");
    }
    let r = rows(&snap);
    assert_eq!(counter(&r, "sturdy.coalesce.coalesced"), 2);
    assert_eq!(
        labels_of(&r, "sturdy.coalesce.coalesced"),
        [l(&[
            ("http.request.method", "HEAD"),
            ("server.address", "api.example.com"),
            ("server.port", "8080")
        ])]
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_past_max_hosts_an_idle_host_is_forgotten_before_new_hosts_share_the_overflow() {
    let (_n, inner) = coalesce_api(|_| (50, full("ok")));
    let (clog, cf) = coalesce_log();
    let (layer, h) = CoalesceLayer::new().with_max_hosts(1).on_event(cf).pair();
    let svc = layer.layer(inner);
    // Host a: one call, done: nothing in flight.
    svc.clone()
        .oneshot(get("http://a.example/x"))
        .await
        .unwrap();
    // Host b: a has nothing in flight, so b gets a table of its own.
    let b1 = tokio::spawn(svc.clone().oneshot(get("http://b.example/x")));
    let b2 = tokio::spawn(svc.clone().oneshot(get("http://b.example/x")));
    tokio::time::sleep(ms(5)).await;
    // Host c while b is in flight: past the bound, the overflow table.
    let c1 = tokio::spawn(svc.clone().oneshot(get("http://C.example/x")));
    let c2 = tokio::spawn(svc.clone().oneshot(get("http://c.example/x")));
    tokio::time::sleep(ms(5)).await;
    assert_eq!(h.in_flight("b.example"), 1);
    assert_eq!(
        h.in_flight("c.example"),
        2,
        "the overflow table holds c's two calls (two URIs as written)"
    );
    for t in [b1, b2, c1, c2] {
        assert_eq!(t.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let cl = clog.lock().unwrap().clone();
    // C.example and c.example are two URIs as written: c's two requests do not join.
    assert_eq!(
        cl,
        [(
            "b.example".to_owned(),
            Some("b.example".to_owned()),
            "GET".to_owned()
        )]
    );
    let c3 = tokio::spawn(svc.clone().oneshot(get("http://b.example/y")));
    let c4 = tokio::spawn(svc.clone().oneshot(get("http://d.example/y")));
    let c5 = tokio::spawn(svc.clone().oneshot(get("http://d.example/y")));
    for t in [c3, c4, c5] {
        assert_eq!(t.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let cl = clog.lock().unwrap().clone();
    assert_eq!(cl.len(), 2, "{cl:?}");
    assert_eq!(cl[1].0, "*", "d joined past the bound: the overflow key");
    assert_eq!(cl[1].1.as_deref(), Some("d.example"), "with its own host");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_the_coalesced_events_host_is_in_lower_case_as_the_hedge_events_host_is() {
    let (_n, inner) = coalesce_api(|_| (20, full("ok")));
    let (clog, cf) = coalesce_log();
    let svc = CoalesceLayer::new().on_event(cf).layer(inner);
    let uri = "http://API.Example.COM:8080/x";
    let out = join_all((0..2).map(|_| svc.clone().oneshot(get(uri)))).await;
    for r in out {
        r.unwrap();
    }
    let cl = clog.lock().unwrap().clone();
    assert_eq!(cl.len(), 1);
    assert_eq!(cl[0].0, "api.example.com:8080", "the key");
    assert_eq!(cl[0].1.as_deref(), Some("api.example.com:8080"), "the host");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_a_leader_cancelled_at_each_point_leaves_the_call_to_the_joiner() {
    // Head after 10 ms, then three chunks 10 ms apart: the leader leaves before its first poll,
    // while the head is awaited, while the body is read, and just before the end.
    for cut in [0u64, 5, 15, 25, 39] {
        let (n, inner) = coalesce_api(|_| {
            (
                10,
                chunked(vec![(10, Ok("aa")), (10, Ok("bb")), (10, Ok("cc"))]),
            )
        });
        let (layer, h) = CoalesceLayer::new().pair();
        let svc = layer.layer(inner);
        let uri = "http://api.example.com/l";
        let leader = tokio::spawn(svc.clone().oneshot(get(uri)));
        tokio::task::yield_now().await;
        let joiner = tokio::spawn(svc.clone().oneshot(get(uri)));
        tokio::time::sleep(ms(cut)).await;
        leader.abort();
        let res = tokio::time::timeout(ms(1_000), joiner)
            .await
            .unwrap_or_else(|_| panic!("cut at {cut} ms: the joiner is stuck"))
            .unwrap()
            .unwrap_or_else(|e| panic!("cut at {cut} ms: {e}"));
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "aabbcc", "cut at {cut} ms");
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "cut at {cut} ms: one upstream call"
        );
        assert_eq!(h.stats().joined(), 1, "cut at {cut} ms");
        assert_eq!(h.in_flight("api.example.com"), 0, "cut at {cut} ms");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_the_last_caller_leaving_cancels_the_shared_call_and_the_next_starts_afresh() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let d2 = dropped.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let inner = service_fn(move |_req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        let mut g = DropGuard(d2.clone(), false);
        async move {
            tokio::time::sleep(ms(if i == 0 { 10_000 } else { 10 })).await;
            g.1 = true;
            drop(g);
            Ok::<_, BoxError>(Response::new(full("ok")))
        }
    });
    let (layer, h) = CoalesceLayer::new().pair();
    let svc = ServiceBuilder::new()
        .timeout(ms(100))
        .layer(layer)
        .service(inner);
    let uri = "http://api.example.com/t";
    let out = join_all((0..3).map(|_| svc.clone().oneshot(get(uri)))).await;
    for r in out {
        assert!(r.unwrap_err().is::<tower::timeout::error::Elapsed>());
    }
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the upstream call was cancelled"
    );
    assert_eq!(h.in_flight("api.example.com"), 0);
    let res = svc.clone().oneshot(get(uri)).await.unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_over_a_limit_of_one_a_waiter_joins_a_call_whose_body_is_still_being_read() {
    let (n, inner) = coalesce_api(|_| {
        (
            20,
            chunked(vec![(10, Ok("aa")), (10, Ok("bb")), (10, Ok("cc"))]),
        )
    });
    let (clog, cf) = coalesce_log();
    let (layer, h) = CoalesceLayer::new().on_event(cf).pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(inner);
    let uri = "http://api.example.com/c";
    let mut a = svc.clone();
    let mut b = svc.clone();
    let fa = a.ready().await.unwrap().call(get(uri));
    let ta = tokio::spawn(fa);
    let tb = tokio::spawn(async move {
        let s = b.ready().await.unwrap();
        s.call(get(uri)).await
    });
    tokio::time::sleep(ms(10)).await;
    assert!(clog.lock().unwrap().is_empty(), "b waits in poll_ready");
    tokio::time::sleep(ms(15)).await;
    assert_eq!(
        clog.lock().unwrap().len(),
        1,
        "after the head, b joined the call whose body is being read"
    );
    for t in [ta, tb] {
        let res = t.await.unwrap().unwrap();
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "aabbcc"
        );
    }
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(h.stats().joined(), 1);
    // The permit came back: a third call goes through.
    let mut c = svc.clone();
    let res = tokio::time::timeout(ms(1_000), async {
        c.ready().await.unwrap().call(get(uri)).await
    })
    .await
    .expect("the permit is free")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_only_empty_get_and_head_bodies_are_coalesced() {
    let (n, inner) = coalesce_api(|_| (20, full("ok")));
    let (layer, h) = CoalesceLayer::new().pair();
    let svc = layer.layer(inner);
    let uri = "http://api.example.com/e";
    let reqs = vec![
        // Two empty GETs (one of an empty Full): one call.
        Request::get(uri).body(Full::default()).unwrap(),
        Request::get(uri).body(Full::new(Bytes::new())).unwrap(),
        // Two GETs with the same body: each its own call.
        Request::get(uri).body(Full::from("q")).unwrap(),
        Request::get(uri).body(Full::from("q")).unwrap(),
        // Two OPTIONS: each its own call.
        Request::options(uri).body(Full::default()).unwrap(),
        Request::options(uri).body(Full::default()).unwrap(),
    ];
    let out = join_all(reqs.into_iter().map(|r| svc.clone().oneshot(r))).await;
    for r in out {
        assert_eq!(r.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(n.load(Ordering::SeqCst), 5);
    let st = h.stats();
    assert_eq!((st.calls(), st.joined()), (2, 1));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_a_first_copy_failing_after_the_hedge_was_sent_leaves_the_hedge_to_answer() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _g = metrics::set_default_local_recorder(&recorder);
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let inner = service_fn(move |req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        let fail = req.uri().path() == "/f" && i == 10;
        async move {
            if fail {
                tokio::time::sleep(ms(15)).await;
                return Err::<Response<Full<Bytes>>, BoxError>(Box::new(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "reset",
                )));
            }
            tokio::time::sleep(ms(10)).await;
            Ok(Response::new(Full::from("hedge")))
        }
    });
    let start = Instant::now();
    let (hlog, hf) = hedge_log(start);
    let (hedge, hh) = HedgeLayer::new().with_min_samples(10).on_event(hf).pair();
    let mut svc = hedge.layer(inner);
    warm(&mut svc, "api.example.com").await;
    let t0 = Instant::now();
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(get("http://api.example.com/f"))
        .await
        .expect("the call waits for the hedge");
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hedge");
    let took = t0.elapsed();
    assert!(took >= ms(20) && took < ms(25), "{took:?}");
    let hs = hh.stats("api.example.com").unwrap();
    assert_eq!(hs.hedges(), 1);
    let r = rows(&snap);
    assert_eq!(counter(&r, "sturdy.hedge.sent"), 1);
    // The hedge gave the only answer, so it answered first.
    let kinds: Vec<_> = hlog.lock().unwrap().iter().map(|e| e.0).collect();
    assert_eq!(kinds, ["sent", "won"]);
    assert_eq!(hs.hedge_wins(), 1);
    assert_eq!(counter(&r, "sturdy.hedge.won"), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_a_hedge_waiting_in_the_rate_limiters_line_leaves_it_when_the_first_copy_answers() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _g = metrics::set_default_local_recorder(&recorder);
    let api = Api::default();
    let inner = api.service(|path, _| if path == "/slow" { 200 } else { 10 });
    // 11 slots at once, then one a second: the hedge would wait about 0.9 s.
    let limit = RateLimitLayer::new(Quota::per_second(1).unwrap().with_burst(11).unwrap())
        .with_max_wait(ms(5_000));
    let (hedge, _hh) = HedgeLayer::new().with_min_samples(10).pair();
    let mut svc = ServiceBuilder::new()
        .layer(hedge)
        .layer(limit)
        .service(inner);
    let start = Instant::now();
    warm(&mut svc, "api.example.com").await;
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(get("http://api.example.com/slow"))
        .await
        .unwrap();
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "/slow#0"
    );
    let t1 = start.elapsed();
    assert!(t1 < ms(320), "the first copy answered at {t1:?}");
    assert_eq!(api.calls_to("/slow"), 1, "the hedge never reached the API");
    // The slot the dropped hedge waited for is free: the next call gets it, about 1 s from the
    // start, not a slot later.
    svc.ready()
        .await
        .unwrap()
        .call(get("http://api.example.com/next"))
        .await
        .unwrap();
    let t2 = start.elapsed();
    assert!(t2 < ms(1_100), "the next call answered at {t2:?}");
    let r = rows(&snap);
    assert_eq!(counter(&r, "sturdy.ratelimit.refusals"), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_under_retry_a_hedge_refused_by_the_breaker_is_no_retry_and_no_stop() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _g = metrics::set_default_local_recorder(&recorder);
    let retries = Arc::new(AtomicUsize::new(0));
    let r2 = retries.clone();
    let api = Api::default();
    let inner = api.service(|path, _| if path == "/slow" { 200 } else { 10 });
    let (breaker, bh) = CircuitBreakerLayer::new().pair();
    let mut svc = ServiceBuilder::new()
        .layer(
            sturdy::retry::RetryLayer::new().on_event(move |e: &Event<'_>| {
                if matches!(e, Event::RetryScheduled { .. } | Event::RetryStopped { .. }) {
                    r2.fetch_add(1, Ordering::SeqCst);
                }
            }),
        )
        .layer(HedgeLayer::new().with_min_samples(10))
        .layer(breaker)
        .service(inner);
    warm(&mut svc, "api.example.com").await;
    let fut = svc
        .ready()
        .await
        .unwrap()
        .call(get("http://api.example.com/slow"));
    let task = tokio::spawn(fut);
    tokio::time::sleep(ms(5)).await;
    bh.force_open("api.example.com");
    let res = task.await.unwrap().expect("the first copy's answer");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls_to("/slow"), 1);
    assert_eq!(retries.load(Ordering::SeqCst), 0);
    let r = rows(&snap);
    assert_eq!(counter(&r, "sturdy.retry.retries"), 0, "{r:?}");
    assert_eq!(counter(&r, "sturdy.retry.stopped"), 0, "{r:?}");
    assert_eq!(counter(&r, "sturdy.circuit.rejections"), 1, "{r:?}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_a_body_announced_past_the_bound_goes_to_the_leader_and_joiners_send_their_own() {
    let (n, inner) = coalesce_api(|i| {
        if i == 0 {
            (20, full("0123456789"))
        } else {
            (20, full("own"))
        }
    });
    let (clog, cf) = coalesce_log();
    let (layer, h) = CoalesceLayer::new().with_max_body(4).on_event(cf).pair();
    let svc = layer.layer(inner);
    let uri = "http://api.example.com/big";
    let out = join_all((0..3).map(|_| svc.clone().oneshot(get(uri)))).await;
    let mut bodies = Vec::new();
    for r in out {
        let res = r.unwrap();
        assert!(!res.body().is_shared());
        let b = res.into_body().collect().await.unwrap().to_bytes();
        bodies.push(String::from_utf8(b.to_vec()).unwrap());
    }
    assert_eq!(bodies, ["0123456789", "own", "own"]);
    assert_eq!(n.load(Ordering::SeqCst), 3);
    let st = h.stats();
    assert_eq!(
        (st.upstream(), st.joined(), st.too_large(), st.fallbacks()),
        (1, 2, 1, 2)
    );
    assert_eq!(clog.lock().unwrap().len(), 2, "the joins were events");
}

/// A tiny seeded generator (xorshift), so runs are the same every time.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_seeded_kept_stack_buffer_timeout_coalesce_hedge_limit_leaves_nothing_behind() {
    for seed in [1u64, 7, 42, 1234] {
        let api = Api::default();
        // One call in eight to a path stalls for 500 ms; the others take 10 ms.
        let inner = api.service(move |path, n| {
            let h = path.len() as u64 * 31 + n as u64 * 17 + seed;
            if h.is_multiple_of(8) {
                500
            } else {
                10
            }
        });
        let (hedge, hh) = HedgeLayer::new().with_min_samples(10).pair();
        let (coalesce, ch) = CoalesceLayer::new().pair();
        let stack = ServiceBuilder::new()
            .timeout(ms(300))
            .layer(coalesce)
            .layer(hedge)
            .concurrency_limit(2)
            .service(inner);
        let svc = tower::buffer::Buffer::new(stack, 8);
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let path = format!("/p{}", rng.next() % 5);
            let cut = rng.next() % 4; // 0: no cut, else cut after 5, 15 or 250 ms
            let gap = rng.next() % 7;
            let mut s = svc.clone();
            tasks.push(tokio::spawn(async move {
                let call = async {
                    let req = get(&format!("http://api.example.com{path}"));
                    let res = s.ready().await?.call(req).await?;
                    let b = res.into_body().collect().await?.to_bytes();
                    Ok::<_, BoxError>(b)
                };
                match cut {
                    0 => call.await.map(|b| (i, path, b)).ok(),
                    c => tokio::time::timeout(ms([5, 15, 250][c as usize - 1]), call)
                        .await
                        .ok()
                        .and_then(|r| r.ok())
                        .map(|b| (i, path, b)),
                }
            }));
            tokio::time::sleep(ms(gap)).await;
        }
        let mut ok = 0;
        for t in tasks {
            if let Some((_, path, body)) = t.await.unwrap() {
                let text = String::from_utf8(body.to_vec()).unwrap();
                assert!(text.starts_with(&format!("{path}#")), "seed {seed}: {text}");
                ok += 1;
            }
        }
        assert!(ok > 20, "seed {seed}: only {ok} answers");
        tokio::time::sleep(ms(1_000)).await;
        let started = api.calls.lock().unwrap().len();
        assert_eq!(ch.in_flight("api.example.com"), 0, "seed {seed}");
        // Every call the API started has ended: answered, or dropped before its answer.
        let dropped = api.dropped.load(Ordering::SeqCst);
        let answered = api.answered.load(Ordering::SeqCst);
        assert_eq!(dropped + answered, started, "seed {seed}");
        if let Some(hs) = hh.stats("api.example.com") {
            assert!(
                (hs.hedges() as f64) <= 0.05 * hs.calls() as f64 + 10.0,
                "seed {seed}: {} hedges for {} calls",
                hs.hedges(),
                hs.calls()
            );
        }
        // Both places under the limit are free: two new calls run side by side.
        let t0 = Instant::now();
        let mut a = svc.clone();
        let mut b = svc.clone();
        let (ra, rb) = tokio::join!(
            async {
                a.ready()
                    .await?
                    .call(get("http://api.example.com/za"))
                    .await
            },
            async {
                b.ready()
                    .await?
                    .call(get("http://api.example.com/zb"))
                    .await
            },
        );
        ra.unwrap();
        rb.unwrap();
        let took = t0.elapsed();
        assert!(took < ms(15), "seed {seed}: the two calls took {took:?}");
    }
}

/// Resolved in the metrics guide: the counter counts calls that joined, a joined call that then
/// sent its own (a shared body past the bound) included, as the handle's `fallbacks` also does.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s110_the_coalesced_metric_counts_only_calls_that_did_not_send_their_own() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _g = metrics::set_default_local_recorder(&recorder);
    let (n, inner) = coalesce_api(|i| {
        if i == 0 {
            (20, full("0123456789"))
        } else {
            (20, full("own"))
        }
    });
    let (layer, h) = CoalesceLayer::new().with_max_body(4).pair();
    let svc = layer.layer(inner);
    let out =
        join_all((0..3).map(|_| svc.clone().oneshot(get("http://api.example.com/big")))).await;
    for r in out {
        r.unwrap();
    }
    assert_eq!(
        n.load(Ordering::SeqCst),
        3,
        "every caller sent its own request"
    );
    assert_eq!(h.stats().fallbacks(), 2);
    let r = rows(&snap);
    // metrics.md: "calls that joined an identical call in flight ... (a joined call whose
    // shared body turned out past the bound then sends its own: it is counted here and in the
    // handle's `fallbacks`)".
    assert_eq!(counter(&r, "sturdy.coalesce.coalesced"), 2, "{r:?}");
}
