//! s39: the whole client stack with every optional layer on at once (coalesce, idempotency,
//! retry, hedge, breaker, rate limit, adaptive concurrency, OAuth2, version, attempt timeout),
//! on paused time against an in-process API: composition with tower's Buffer and
//! ConcurrencyLimit, cancellation at every await, one idempotency key across hedges and retries,
//! hostile rate-limit headers, and the README/ARCHITECTURE sentences on what each layer sees.

#![cfg(feature = "full")]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::circuit::{CircuitBreakerLayer, CircuitHandle, CircuitState};
use sturdy::coalesce::{CoalesceHandle, CoalesceLayer, ResponseBody};
use sturdy::concurrency::{AdaptiveConcurrencyLayer, ConcurrencyHandle};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, CircuitOpen, Delivery, RateLimited};
use sturdy::hedge::{HedgeHandle, HedgeLayer};
use sturdy::ratelimit::{Quota, RateLimitHandle, RateLimitLayer};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::version::VersionLayer;
use sturdy::{Client, ClientBuilder};
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};

pub(crate) const HOST: &str = "api.test";

pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(crate) fn url(path: &str) -> String {
    format!("http://{HOST}{path}")
}

pub(crate) fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(url(path)).body(Full::default()).unwrap()
}

pub(crate) fn post(path: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(url(path))
        .header("content-type", "application/json")
        .body(Full::from(body))
        .unwrap()
}

pub(crate) fn resp(status: u16, headers: &[(&str, &str)]) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::from("body")).unwrap()
}

/// What the API does with its n-th API request (from 0; token requests not counted).
pub(crate) enum Step {
    Reply(u64, Response<Full<Bytes>>),
}

#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) key: Option<String>,
    pub(crate) auth: Option<String>,
    pub(crate) version: Option<String>,
    pub(crate) at: Duration,
}

type Script = Arc<dyn Fn(usize, &Request<Full<Bytes>>) -> Step + Send + Sync>;

/// An in-process API and token endpoint (`/oauth/token`) on paused time.
#[derive(Clone)]
pub(crate) struct Api {
    log: Arc<Mutex<Vec<Seen>>>,
    n: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    tokens: Arc<AtomicUsize>,
    pub(crate) token_delay: Arc<AtomicU64>,
    pub(crate) token_status: Arc<AtomicU64>,
    pub(crate) start: Instant,
    script: Script,
}

struct InFlight(Arc<AtomicUsize>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type Http = BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError>;

impl Api {
    pub(crate) fn new(
        script: impl Fn(usize, &Request<Full<Bytes>>) -> Step + Send + Sync + 'static,
    ) -> Self {
        Self {
            log: Arc::default(),
            n: Arc::default(),
            in_flight: Arc::default(),
            tokens: Arc::default(),
            token_delay: Arc::default(),
            token_status: Arc::default(),
            start: Instant::now(),
            script: Arc::new(script),
        }
    }

    pub(crate) fn service(&self) -> Http {
        let api = self.clone();
        BoxCloneSyncService::new(tower::service_fn(move |req: Request<Full<Bytes>>| {
            let api = api.clone();
            async move {
                if req.uri().path() == "/oauth/token" {
                    let n = api.tokens.fetch_add(1, Ordering::SeqCst) + 1;
                    let d = api.token_delay.load(Ordering::SeqCst);
                    tokio::time::sleep(ms(d)).await;
                    let st = api.token_status.load(Ordering::SeqCst);
                    if st != 0 {
                        return Ok(Response::builder()
                            .status(st as u16)
                            .body(Full::from("down"))
                            .unwrap());
                    }
                    let body = format!(
                        r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":3600}}"#
                    );
                    return Ok::<_, BoxError>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::from(body))
                            .unwrap(),
                    );
                }
                let h = |name: &str| {
                    req.headers()
                        .get(name)
                        .map(|v| v.to_str().unwrap_or("?").to_owned())
                };
                api.log.lock().unwrap().push(Seen {
                    method: req.method().clone(),
                    path: req.uri().path().to_owned(),
                    key: h("idempotency-key"),
                    auth: h("authorization"),
                    version: h("api-version"),
                    at: api.start.elapsed(),
                });
                let n = api.n.fetch_add(1, Ordering::SeqCst);
                api.in_flight.fetch_add(1, Ordering::SeqCst);
                let _guard = InFlight(api.in_flight.clone());
                let Step::Reply(d, res) = (api.script)(n, &req);
                tokio::time::sleep(ms(d)).await;
                Ok(res)
            }
        }))
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }
    pub(crate) fn count(&self) -> usize {
        self.n.load(Ordering::SeqCst)
    }
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
    pub(crate) fn token_requests(&self) -> usize {
        self.tokens.load(Ordering::SeqCst)
    }
}

pub(crate) struct Handles {
    pub(crate) hedge: HedgeHandle,
    pub(crate) coalesce: CoalesceHandle,
    pub(crate) conc: ConcurrencyHandle,
    pub(crate) rl: RateLimitHandle,
    pub(crate) cb: CircuitHandle,
    pub(crate) events: Arc<Mutex<Vec<String>>>,
}

pub(crate) struct Opts {
    pub(crate) quota: Option<Quota>,
    pub(crate) conc_limit: usize,
    pub(crate) breaker_streak: u32,
    pub(crate) attempts: u32,
    pub(crate) hedge_min_samples: u64,
    pub(crate) version: Option<VersionLayer>,
    pub(crate) conc_max_wait: Option<Duration>,
    pub(crate) open_for: Option<Duration>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            quota: None,
            conc_limit: 20,
            breaker_streak: 0,
            attempts: 4,
            hedge_min_samples: 20,
            version: None,
            conc_max_wait: None,
            open_for: None,
        }
    }
}

pub(crate) fn record(ev: &Arc<Mutex<Vec<String>>>) -> impl Fn(&Event<'_>) + Send + Sync + 'static {
    let ev = ev.clone();
    move |e: &Event<'_>| {
        let s = match e {
            Event::RetryScheduled {
                attempt, refused, ..
            } => {
                format!("retry_scheduled attempt={attempt} refused={refused}")
            }
            Event::RetryStopped { stop, .. } => format!("retry_stopped {stop:?}"),
            Event::HedgeSent { .. } => "hedge_sent".into(),
            Event::HedgeWon { .. } => "hedge_won".into(),
            Event::Coalesced { .. } => "coalesced".into(),
            Event::RateLimitPaused { pause, .. } => format!("paused {pause:?}"),
            Event::RateLimitWaited { .. } => "rl_waited".into(),
            Event::RateLimitRefused { .. } => "rl_refused".into(),
            Event::CircuitChanged { to, .. } => format!("circuit {to:?}"),
            Event::TokenFetched { .. } => "token_fetched".into(),
            Event::TokenRejected { .. } => "token_rejected".into(),
            _ => return,
        };
        ev.lock().unwrap().push(s);
    }
}

/// The whole stack, every optional layer on, over the in-process API.
pub(crate) fn full(api: &Api, o: Opts) -> (Client<ResponseBody<Full<Bytes>>>, Handles) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let (hedge_l, hedge) = HedgeLayer::new()
        .with_min_samples(o.hedge_min_samples)
        .with_keyed_requests(true)
        .on_event(record(&events))
        .pair();
    let (co_l, coalesce) = CoalesceLayer::new().on_event(record(&events)).pair();
    let mut conc_l = AdaptiveConcurrencyLayer::new();
    if let Some(w) = o.conc_max_wait {
        conc_l = conc_l.with_max_wait(w);
    }
    let (conc_l, conc) = conc_l
        .with_initial_limit(o.conc_limit)
        .with_limits(o.conc_limit.min(20), o.conc_limit.max(20))
        .on_event(record(&events))
        .pair();
    let rl_l = match o.quota {
        Some(q) => RateLimitLayer::new(q),
        None => RateLimitLayer::adaptive_only(),
    };
    let (rl_l, rl) = rl_l.on_event(record(&events)).pair();
    let mut cb_l = CircuitBreakerLayer::new();
    if o.breaker_streak > 0 {
        cb_l = cb_l.with_consecutive_failures(o.breaker_streak);
    }
    if let Some(d) = o.open_for {
        cb_l = cb_l.with_open_duration(d, d * 4);
    }
    let (cb_l, cb) = cb_l.on_event(record(&events)).pair();
    let retry = RetryLayer::new()
        .with_max_attempts(o.attempts)
        .with_backoff(Backoff::decorrelated_jitter(ms(100), ms(400)).unwrap())
        .on_event(record(&events));
    let tokens = ClientCredentials::new(api.service(), &url("/oauth/token"), "client", "secret")
        .unwrap()
        .on_event(record(&events));
    let client = ClientBuilder::new()
        .with_retry(retry)
        .with_hedge(hedge_l)
        .with_circuit_breaker(cb_l)
        .with_rate_limit(rl_l)
        .with_adaptive_concurrency(conc_l)
        .with_auth(AuthLayer::oauth2(tokens).on_event(record(&events)))
        .with_version(
            o.version
                .unwrap_or_else(|| VersionLayer::header("api-version", "2024-06-01").unwrap()),
        )
        .with_attempt_timeout(Duration::from_secs(5))
        .with_coalesce(co_l)
        .build(api.service());
    (
        client,
        Handles {
            hedge,
            coalesce,
            conc,
            rl,
            cb,
            events,
        },
    )
}

/// The first `CallReport` of a `sturdy::core::Error` in the error's source chain.
pub(crate) fn report_in_chain(
    err: &(dyn std::error::Error + Send + Sync + 'static),
) -> Option<sturdy::core::CallReport> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e
            .downcast_ref::<sturdy::core::Error>()
            .and_then(|e| e.report())
        {
            return Some(r.clone());
        }
        cur = e.source();
    }
    None
}

pub(crate) fn ok_after(d: u64) -> Step {
    Step::Reply(d, resp(200, &[]))
}

pub(crate) fn count(ev: &Arc<Mutex<Vec<String>>>, prefix: &str) -> usize {
    ev.lock()
        .unwrap()
        .iter()
        .filter(|e| e.starts_with(prefix))
        .count()
}

pub(crate) async fn status<B>(
    c: &Client<B>,
    req: Request<Full<Bytes>>,
) -> Result<StatusCode, BoxError> {
    c.clone().oneshot(req).await.map(|r| r.status())
}

/// Warms the hedge histogram of HOST with `n` GETs of `latency` ms each.
pub(crate) async fn warm<B>(c: &Client<B>, n: usize) {
    for i in 0..n {
        let s = status(c, get(&format!("/warm/{i}"))).await.unwrap();
        assert!(s.is_success(), "{s}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Composition with tower's own layers.

#[test]
fn s39_full_client_is_send_sync_clone_static() {
    fn assert_all<T: Send + Sync + Clone + 'static>() {}
    assert_all::<Client<ResponseBody<Full<Bytes>>>>();
    assert_all::<Client<ResponseBody<hyper::body::Incoming>>>();
}

#[tokio::test(start_paused = true)]
async fn s39_full_stack_under_buffer_and_concurrency_limit_many_tasks() {
    let api = Api::new(|n, _| {
        if n % 7 == 3 {
            Step::Reply(2, resp(503, &[]))
        } else {
            ok_after(5)
        }
    });
    let (client, h) = full(&api, Opts::default());
    let svc = ServiceBuilder::new()
        .buffer(4)
        .concurrency_limit(1)
        .service(client.clone());
    let mut futs = Vec::new();
    for i in 0..30 {
        let mut svc = svc.clone();
        futs.push(async move {
            let req = if i % 3 == 0 {
                post("/orders", r#"{"o":1}"#)
            } else {
                get(&format!("/r/{}", i % 5))
            };
            let r: Result<StatusCode, BoxError> = if i % 2 == 0 {
                svc.oneshot(req).await.map(|r| r.status())
            } else {
                match svc.ready().await {
                    Ok(ready) => ready.call(req).await.map(|r| r.status()),
                    Err(e) => Err(e),
                }
            };
            r
        });
    }
    let all = tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(futs),
    )
    .await
    .expect("a call hung under Buffer + ConcurrencyLimit(1)");
    for r in all {
        assert_eq!(r.unwrap(), 200);
    }
    // Nothing is held: a new call through the same Buffer goes at once.
    let t0 = Instant::now();
    let s = svc.oneshot(get("/after")).await.unwrap().status();
    assert_eq!(s, 200);
    assert!(t0.elapsed() < ms(50), "took {:?}", t0.elapsed());
    assert_eq!(h.conc.state(HOST).map(|s| s.in_flight()), Some(0));
    assert_eq!(h.rl.waiting(HOST), 0);
    assert_eq!(api.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn s39_full_stack_over_concurrency_limit_1_kept_service() {
    let api = Api::new(|n, req| {
        if n % 5 == 1 && req.uri().path() != "/last" {
            Step::Reply(2, resp(503, &[]))
        } else {
            ok_after(5)
        }
    });
    let limited = ServiceBuilder::new()
        .concurrency_limit(1)
        .service(api.service());
    let (hedge_l, _) = HedgeLayer::new().with_min_samples(5).pair();
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new().with_backoff(Backoff::decorrelated_jitter(ms(50), ms(200)).unwrap()),
        )
        .with_hedge(hedge_l)
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_coalesce(CoalesceLayer::new())
        .with_version(VersionLayer::header("api-version", "1").unwrap())
        .build(BoxCloneSyncService::new(limited));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut kept = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for j in 0..3 {
                let req = if (i + j) % 4 == 0 {
                    post("/orders", r#"{"x":1}"#)
                } else {
                    get(&format!("/k/{}", (i * 3 + j) % 6))
                };
                let r = kept.ready().await?.call(req).await?;
                out.push(r.status());
            }
            Ok::<_, BoxError>(out)
        }));
    }
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(300), t)
            .await
            .expect("hung over ConcurrencyLimit(1)")
            .unwrap()
            .unwrap();
        assert!(r.iter().all(|s| *s == 200), "{r:?}");
    }
    let t0 = Instant::now();
    assert_eq!(status(&client, get("/last")).await.unwrap(), 200);
    assert!(t0.elapsed() < ms(50), "{:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 2. Cancellation at every await.

#[tokio::test(start_paused = true)]
async fn s39_drop_while_waiting_for_a_rate_slot_leaves_the_line() {
    let api = Api::new(|_, _| ok_after(1));
    let (client, h) = full(
        &api,
        Opts {
            quota: Some(Quota::per_second(1).unwrap()),
            ..Opts::default()
        },
    );
    // Warm the token cache (its request is not an API call but goes through the same http).
    assert_eq!(status(&client, get("/a")).await.unwrap(), 200);
    let t0 = Instant::now();
    // The next slot is ~1 s away: B waits, then is dropped.
    let b = tokio::time::timeout(ms(100), status(&client, get("/b"))).await;
    assert!(b.is_err(), "B was not waiting: {b:?}");
    assert_eq!(h.rl.waiting(HOST), 0, "the dropped caller stayed in line");
    // C takes the slot B would have had, not the one after it.
    assert_eq!(status(&client, get("/c")).await.unwrap(), 200);
    assert!(
        t0.elapsed() < ms(1200),
        "C waited {:?}: the dropped caller kept its slot",
        t0.elapsed()
    );
    let paths: Vec<_> = api.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/a", "/c"]);
}

#[tokio::test(start_paused = true)]
async fn s39_drop_while_waiting_for_adaptive_concurrency_gives_back_the_place() {
    let api = Api::new(|_, req| {
        if req.uri().path() == "/slow" {
            ok_after(500)
        } else {
            ok_after(5)
        }
    });
    let (client, h) = full(
        &api,
        Opts {
            conc_limit: 1,
            ..Opts::default()
        },
    );
    h.conc.set_limit(HOST, 1);
    let c2 = client.clone();
    let slow = tokio::spawn(async move { status(&c2, get("/slow")).await.unwrap() });
    tokio::time::sleep(ms(50)).await;
    assert_eq!(h.conc.state(HOST).map(|s| s.in_flight()), Some(1));
    let b = tokio::time::timeout(ms(100), status(&client, get("/b"))).await;
    assert!(b.is_err(), "B did not wait for the limit: {b:?}");
    assert_eq!(h.conc.state(HOST).map(|s| s.waiting()), Some(0));
    assert_eq!(slow.await.unwrap(), 200);
    let st = h.conc.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0), "{st:?}");
    let t0 = Instant::now();
    assert_eq!(status(&client, get("/c")).await.unwrap(), 200);
    assert!(t0.elapsed() < ms(20), "C waited {:?}", t0.elapsed());
    assert!(!api.seen().iter().any(|s| s.path == "/b"));
}

#[tokio::test(start_paused = true)]
async fn s39_drop_during_hedge_delay_and_after_hedge_frees_everything() {
    let api = Api::new(|_, req| {
        if req.uri().path().starts_with("/slow") {
            ok_after(2_000)
        } else {
            ok_after(10)
        }
    });
    let (client, h) = full(&api, Opts::default());
    warm(&client, 60).await;
    let delay = h.hedge.stats(HOST).and_then(|s| s.delay());
    assert!(delay.is_some(), "no hedge delay after 60 samples");
    let delay = delay.unwrap();
    // Dropped before the hedge is due.
    let r = tokio::time::timeout(delay / 2, status(&client, get("/slow/1"))).await;
    assert!(r.is_err());
    tokio::time::sleep(ms(1)).await;
    assert_eq!(api.in_flight(), 0, "the dropped call's copy still runs");
    // Dropped after the hedge went out: both copies go.
    let sent_before = h.hedge.stats(HOST).unwrap().hedges();
    let r = tokio::time::timeout(delay * 3, status(&client, get("/slow/2"))).await;
    assert!(r.is_err());
    tokio::time::sleep(ms(1)).await;
    let sent = h.hedge.stats(HOST).unwrap().hedges() - sent_before;
    assert_eq!(sent, 1, "the hedge of /slow/2 was not sent");
    assert_eq!(
        api.in_flight(),
        0,
        "a dropped hedged call left a copy running"
    );
    let st = h.conc.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
    assert_eq!(h.cb.state(HOST), Some(CircuitState::Closed));
    let t0 = Instant::now();
    assert_eq!(status(&client, get("/fast")).await.unwrap(), 200);
    assert!(t0.elapsed() <= ms(15), "{:?}", t0.elapsed());
}

#[tokio::test(start_paused = true)]
async fn s39_coalesced_follower_gets_the_answer_when_the_leader_is_dropped() {
    let api = Api::new(|_, _| ok_after(100));
    let (client, h) = full(&api, Opts::default());
    warm(&client, 1).await; // token
    let base = api.count();
    let c1 = client.clone();
    let leader = tokio::spawn(async move { status(&c1, get("/same")).await });
    tokio::time::sleep(ms(10)).await;
    let c2 = client.clone();
    let follower = tokio::spawn(async move { status(&c2, get("/same")).await });
    tokio::time::sleep(ms(10)).await;
    leader.abort();
    let r = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("the follower hung after its leader was dropped")
        .unwrap();
    assert_eq!(r.unwrap(), 200);
    assert_eq!(api.count() - base, 1, "the follower sent its own request");
    assert_eq!(h.coalesce.stats().joined(), 1);
    // Everybody gone: the upstream call is dropped, and the next one starts afresh.
    let c3 = client.clone();
    let t = tokio::spawn(async move { status(&c3, get("/gone")).await });
    tokio::time::sleep(ms(20)).await;
    t.abort();
    tokio::time::sleep(ms(1)).await;
    assert_eq!(
        api.in_flight(),
        0,
        "an upstream call nobody awaits kept running"
    );
    assert_eq!(h.coalesce.in_flight(HOST), 0);
    assert_eq!(status(&client, get("/gone")).await.unwrap(), 200);
}

#[tokio::test(start_paused = true)]
async fn s39_drop_during_retry_backoff_leaves_nothing_behind() {
    let api = Api::new(|n, _| {
        if n == 1 {
            Step::Reply(1, resp(503, &[]))
        } else {
            ok_after(1)
        }
    });
    let (client, h) = full(
        &api,
        Opts {
            breaker_streak: 2,
            ..Opts::default()
        },
    );
    warm(&client, 1).await;
    // 503, then a backoff of at least 100 ms: dropped at 50 ms.
    let r = tokio::time::timeout(ms(50), status(&client, post("/orders", "{}"))).await;
    assert!(r.is_err());
    tokio::time::sleep(ms(1_000)).await;
    assert_eq!(api.count(), 2, "the dropped call retried anyway");
    assert_eq!(h.cb.state(HOST), Some(CircuitState::Closed));
    let st = h.conc.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
    let t0 = Instant::now();
    assert_eq!(status(&client, get("/x")).await.unwrap(), 200);
    assert!(t0.elapsed() < ms(10));
}

#[tokio::test(start_paused = true)]
async fn s39_drop_during_token_fetch_does_not_cancel_it_for_others() {
    let api = Api::new(|_, _| ok_after(1));
    api.token_delay.store(300, Ordering::SeqCst);
    let (client, h) = full(&api, Opts::default());
    let t0 = Instant::now();
    let r = tokio::time::timeout(ms(50), status(&client, get("/a"))).await;
    assert!(r.is_err());
    tokio::time::sleep(ms(50)).await;
    assert_eq!(status(&client, get("/b")).await.unwrap(), 200);
    assert!(t0.elapsed() < ms(320), "B waited {:?}", t0.elapsed());
    assert_eq!(api.token_requests(), 1, "the token request was restarted");
    let paths: Vec<_> = api.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/b"]);
    assert_eq!(h.conc.state(HOST).map(|s| s.in_flight()), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 3. Idempotency across hedge, retry and coalesce.

#[tokio::test(start_paused = true)]
async fn s39_post_retried_and_hedged_carries_one_key_on_every_attempt() {
    // POST 1 => 503, POST 2 => slow (hedged), POST 3 (the hedge) => 201.
    let posts = Arc::new(AtomicUsize::new(0));
    let p = posts.clone();
    let api = Api::new(move |_, req| {
        if req.method() == Method::POST {
            match p.fetch_add(1, Ordering::SeqCst) {
                0 => Step::Reply(2, resp(503, &[])),
                1 => Step::Reply(3_000, resp(201, &[])),
                _ => Step::Reply(10, resp(201, &[])),
            }
        } else {
            ok_after(10)
        }
    });
    let (client, h) = full(&api, Opts::default());
    warm(&client, 60).await;
    let res = client
        .clone()
        .oneshot(post("/orders", r#"{"item":"book"}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let posts: Vec<_> = api
        .seen()
        .into_iter()
        .filter(|s| s.method == Method::POST)
        .collect();
    assert_eq!(posts.len(), 3, "{posts:?}");
    let keys: HashSet<_> = posts.iter().map(|s| s.key.clone()).collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys.iter().all(|k| k.is_some()));
    assert!(posts
        .iter()
        .all(|s| s.auth.as_deref() == Some("Bearer tok-1")));
    assert!(posts
        .iter()
        .all(|s| s.version.as_deref() == Some("2024-06-01")));
    assert_eq!(count(&h.events, "hedge_sent"), 1);
    assert_eq!(count(&h.events, "retry_scheduled"), 1);
}

#[tokio::test(start_paused = true)]
async fn s39_identical_posts_are_never_coalesced() {
    let api = Api::new(|_, _| Step::Reply(50, resp(201, &[])));
    let (client, h) = full(&api, Opts::default());
    warm(&client, 1).await;
    let base = api.count();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            status(&c, post("/orders", r#"{"same":1}"#)).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    assert_eq!(api.count() - base, 5);
    assert_eq!(h.coalesce.stats().joined(), 0);
    let keys: HashSet<_> = api.seen().into_iter().filter_map(|s| s.key).collect();
    assert_eq!(
        keys.len(),
        5,
        "two deliberate identical orders are two orders"
    );
}

#[tokio::test(start_paused = true)]
async fn s39_a_429_retry_after_on_one_call_holds_every_caller() {
    let api = Api::new(|n, _| {
        if n == 1 {
            Step::Reply(1, resp(429, &[("retry-after", "2")]))
        } else {
            ok_after(1)
        }
    });
    let (client, h) = full(&api, Opts::default());
    warm(&client, 1).await;
    let t0 = api.start.elapsed();
    let c = client.clone();
    let a = tokio::spawn(async move { status(&c, get("/a")).await });
    tokio::time::sleep(ms(20)).await;
    assert!(
        h.rl.pause(HOST).is_some(),
        "no pause after a 429 with Retry-After"
    );
    let mut others = Vec::new();
    for i in 0..5 {
        let c = client.clone();
        others.push(tokio::spawn(async move {
            status(&c, get(&format!("/o/{i}"))).await
        }));
    }
    assert_eq!(a.await.unwrap().unwrap(), 200);
    for o in others {
        assert_eq!(o.await.unwrap().unwrap(), 200);
    }
    for s in api.seen().iter().filter(|s| s.at > t0 + ms(5)) {
        assert!(
            s.at >= t0 + ms(2_000),
            "{} reached the server {:?} after the 429 asked for 2 s",
            s.path,
            s.at - t0
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Hostile values.

#[tokio::test(start_paused = true)]
async fn s39_huge_retry_after_fails_at_once_and_the_pause_is_capped() {
    let api = Api::new(|n, _| {
        if n == 1 {
            Step::Reply(1, resp(429, &[("retry-after", "99999999999999999999")]))
        } else {
            ok_after(1)
        }
    });
    let (client, h) = full(&api, Opts::default());
    warm(&client, 1).await;
    let t0 = Instant::now();
    let err = status(&client, post("/orders", "{}")).await.unwrap_err();
    assert!(t0.elapsed() < ms(100), "slept {:?}", t0.elapsed());
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("no RateLimited in the chain");
    assert!(rl.retry_after() <= Duration::from_secs(300), "{rl:?}");
    let pause = h.rl.pause(HOST).expect("no pause");
    assert!(pause <= Duration::from_secs(300), "{pause:?}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::MaybeProcessed,
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("rate limited") || msg.contains("429"), "{msg}");
    // A later call is refused at once without being sent (its wait is past the 30 s max wait).
    let n = api.count();
    let t0 = Instant::now();
    let err = status(&client, get("/later")).await.unwrap_err();
    assert!(t0.elapsed() < ms(100), "waited {:?}", t0.elapsed());
    assert_eq!(api.count(), n);
    assert!(sturdy::core::find::<RateLimited>(&*err).is_some(), "{err}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::NotSent,
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn s39_garbage_and_negative_retry_after_do_not_break_the_stack() {
    for bad in ["-5", "soon", "1e9", "", "Wed, 99 Foo 9999 99:99:99 GMT"] {
        let api = Api::new(move |n, _| {
            if n == 1 {
                Step::Reply(1, resp(429, &[("retry-after", bad)]))
            } else {
                ok_after(1)
            }
        });
        let (client, _h) = full(&api, Opts::default());
        warm(&client, 1).await;
        let t0 = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(120), status(&client, get("/x")))
            .await
            .unwrap_or_else(|_| panic!("Retry-After {bad:?}: hung"));
        match r {
            Ok(s) => assert_eq!(s, 200, "Retry-After {bad:?}"),
            Err(e) => panic!("Retry-After {bad:?}: {e}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(61),
            "Retry-After {bad:?}: {:?}",
            t0.elapsed()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn s39_ratelimit_header_with_a_huge_reset_is_capped() {
    let api = Api::new(|n, _| {
        if n == 1 {
            Step::Reply(
                1,
                resp(
                    200,
                    &[
                        ("ratelimit", r#""default";r=0;t=99999999999"#),
                        ("ratelimit-policy", r#""default";q=100;w=60"#),
                    ],
                ),
            )
        } else {
            ok_after(1)
        }
    });
    let (client, h) = full(&api, Opts::default());
    warm(&client, 1).await;
    assert_eq!(status(&client, get("/x")).await.unwrap(), 200);
    let pause = h.rl.pause(HOST).expect("no pause from RateLimit r=0");
    assert!(pause <= Duration::from_secs(300), "{pause:?}");
    let err = status(&client, get("/y")).await.unwrap_err();
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("no RateLimited");
    assert!(rl.retry_after() <= Duration::from_secs(300), "{rl:?}");
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    let report = report_in_chain(&*err).expect("no CallReport anywhere in the chain");
    assert_eq!(report.attempts(), 0, "{err}");
}

#[tokio::test(start_paused = true)]
async fn s39_a_429_storm_ends_and_spares_the_server() {
    let api = Api::new(|_, _| Step::Reply(1, resp(429, &[])));
    let (client, h) = full(&api, Opts::default());
    // The token is not an API request: all API requests get 429.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            status(&c, get(&format!("/s/{i}"))).await
        }));
    }
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(600), t)
            .await
            .expect("a call hung in a 429 storm")
            .unwrap();
        match r {
            Ok(s) => assert_eq!(s, 429),
            Err(e) => assert!(sturdy::core::find::<RateLimited>(&*e).is_some(), "{e}"),
        }
    }
    // The first wave goes at once; after it the key is paced: no stampede of retries.
    let times: Vec<_> = api.seen().iter().map(|s| s.at).collect();
    for w in times[20..].windows(2) {
        assert!(
            w[1] - w[0] >= ms(200),
            "retries bunched up in a 429 storm: {times:?}"
        );
    }
    assert_eq!(
        h.cb.state(HOST),
        Some(CircuitState::Closed),
        "429 is not a failure"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. What each layer sees.

#[tokio::test(start_paused = true)]
async fn s39_breaker_counts_attempts_not_calls() {
    let api = Api::new(|_, _| Step::Reply(1, resp(503, &[])));
    let (client, h) = full(
        &api,
        Opts {
            breaker_streak: 3,
            attempts: 3,
            ..Opts::default()
        },
    );
    let r = status(&client, get("/x")).await.unwrap();
    assert_eq!(r, 503);
    assert_eq!(api.count(), 3);
    assert!(
        matches!(h.cb.state(HOST), Some(CircuitState::Open { .. })),
        "{:?}",
        h.cb.state(HOST)
    );
    let err = status(&client, get("/y")).await.unwrap_err();
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(api.count(), 3, "an open breaker let a call through");
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
}

#[tokio::test(start_paused = true)]
async fn s39_a_dropped_hedge_loser_is_not_a_breaker_failure() {
    let slow = Arc::new(AtomicUsize::new(0));
    let s = slow.clone();
    let api = Api::new(move |_, req| {
        if req.uri().path() == "/slow" && s.fetch_add(1, Ordering::SeqCst) == 0 {
            ok_after(2_000)
        } else {
            ok_after(10)
        }
    });
    let (client, h) = full(
        &api,
        Opts {
            breaker_streak: 1,
            ..Opts::default()
        },
    );
    warm(&client, 60).await;
    assert_eq!(status(&client, get("/slow")).await.unwrap(), 200);
    assert_eq!(
        count(&h.events, "hedge_won"),
        1,
        "{:?}",
        h.events.lock().unwrap()
    );
    assert_eq!(h.cb.state(HOST), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn s39_coalesced_calls_take_one_rate_slot() {
    let api = Api::new(|_, _| ok_after(50));
    let (client, h) = full(
        &api,
        Opts {
            quota: Some(Quota::per_second(1).unwrap()),
            ..Opts::default()
        },
    );
    // Let the quota refill after the token request... (the token endpoint is not limited).
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move { status(&c, get("/same")).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    assert!(t0.elapsed() < ms(200), "took {:?}", t0.elapsed());
    assert_eq!(api.count(), 1);
    assert_eq!(h.coalesce.stats().joined(), 9);
    assert_eq!(count(&h.events, "coalesced"), 9);
    assert_eq!(count(&h.events, "rl_waited"), 0);
}

#[tokio::test(start_paused = true)]
async fn s39_a_401_refresh_is_one_attempt_not_a_retry() {
    let api = Api::new(|n, _| {
        if n == 0 {
            Step::Reply(1, resp(401, &[]))
        } else {
            ok_after(1)
        }
    });
    let (client, h) = full(
        &api,
        Opts {
            attempts: 1,
            ..Opts::default()
        },
    );
    assert_eq!(status(&client, post("/orders", "{}")).await.unwrap(), 200);
    assert_eq!(api.token_requests(), 2);
    assert_eq!(
        count(&h.events, "retry_"),
        0,
        "{:?}",
        h.events.lock().unwrap()
    );
    assert_eq!(count(&h.events, "token_rejected"), 1);
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].key, seen[1].key,
        "the replay after 401 changed the key"
    );
    assert_eq!(seen[1].auth.as_deref(), Some("Bearer tok-2"));
}

#[tokio::test(start_paused = true)]
async fn s39_hedged_copies_each_take_a_concurrency_place() {
    // Limit 1: the hedge of a slow call cannot go past the host's limit.
    let slow = Arc::new(AtomicUsize::new(0));
    let s = slow.clone();
    let api = Api::new(move |_, req| {
        if req.uri().path() == "/slow" && s.fetch_add(1, Ordering::SeqCst) == 0 {
            ok_after(300)
        } else {
            ok_after(10)
        }
    });
    let (client, h) = full(
        &api,
        Opts {
            conc_limit: 1,
            ..Opts::default()
        },
    );
    warm(&client, 60).await;
    h.conc.set_limit(HOST, 1);
    assert_eq!(h.conc.limit(HOST), Some(1));
    let peak = Arc::new(AtomicUsize::new(0));
    let (p, a) = (peak.clone(), api.clone());
    let watcher = tokio::spawn(async move {
        loop {
            p.fetch_max(a.in_flight(), Ordering::SeqCst);
            tokio::time::sleep(ms(1)).await;
        }
    });
    assert_eq!(status(&client, get("/slow")).await.unwrap(), 200);
    watcher.abort();
    assert_eq!(
        peak.load(Ordering::SeqCst),
        1,
        "a hedge went past a limit of 1"
    );
}

#[tokio::test(start_paused = true)]
async fn s39_full_client_error_carries_the_call_report_on_top() {
    let api = Api::new(|_, _| Step::Reply(1, resp(503, &[("retry-after", "3600")])));
    let (client, _h) = full(&api, Opts::default());
    let err = status(&client, get("/x")).await.unwrap_err();
    assert!(report_in_chain(&*err).is_some(), "no report at all: {err}");
    let top = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("not a sturdy Error");
    assert!(
        top.report().is_some(),
        "top-level error has no CallReport: {err}"
    );
    let found = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert!(
        found.report().is_some(),
        "find::<Error> finds one without a report: {err}"
    );
}

#[tokio::test(start_paused = true)]
async fn s39_a_call_waiting_for_a_server_pause_is_not_hedged() {
    let api = Api::new(|_, req| {
        if req.uri().path() == "/limited" {
            Step::Reply(1, resp(429, &[("retry-after", "1")]))
        } else {
            ok_after(10)
        }
    });
    let (client, h) = full(
        &api,
        Opts {
            attempts: 1,
            ..Opts::default()
        },
    );
    warm(&client, 60).await;
    let before = h.hedge.stats(HOST).unwrap().hedges();
    let _ = status(&client, get("/limited")).await;
    assert!(h.rl.pause(HOST).is_some());
    let n = api.count();
    // Waits ~1 s in the limiter's line for the pause, then is answered in 10 ms.
    assert_eq!(status(&client, get("/after-pause")).await.unwrap(), 200);
    assert_eq!(api.count() - n, 1);
    let hedges = h.hedge.stats(HOST).unwrap().hedges() - before;
    assert_eq!(
        hedges,
        0,
        "a call held by the server's pause was hedged; events: {:?}",
        h.events.lock().unwrap()
    );
}
