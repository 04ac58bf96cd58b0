//! Calls that wait: they leave in order, at the quota's pace after a pause, and a call dropped
//! while it waits gives its place back. Paused time, exact send times.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use sturdy_core::{BoxError, RateLimited};
use sturdy_ratelimit::{BoxFuture, DirectLimiter, Quota, RateLimitLayer, RemoteQuota, Reserve};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::support;
use support::{get, ms, status_with, Api};

/// Lets every spawned task run until it waits.
async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn after_a_429_the_16_waiting_calls_leave_at_the_quotas_pace() {
    // Quota 10/s, burst 1. Every answer takes 50 ms; the first is a 429 with Retry-After: 2,
    // which arrives while the 16 other calls wait in line for their slots.
    let api = Api::with(vec![status_with(429, &[("retry-after", "2")])]).with_latency(ms(50));
    let svc = RateLimitLayer::new(Quota::per_second(10).unwrap()).layer(api.service());
    let start = Instant::now();
    let calls: Vec<_> = (0..17)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let t = api.since(start);
    assert_eq!(t[0], Duration::ZERO);
    // The pause ends at 2.05 s; then one call per 100 ms, each in its own GCRA slot.
    let want: Vec<Duration> = (0..16).map(|i| ms(2_050 + 100 * i)).collect();
    assert_eq!(t[1..], want[..]);
}

#[tokio::test(start_paused = true)]
async fn without_a_quota_the_calls_that_waited_leave_by_slow_start() {
    // adaptive_only: no quota of our own. A 429 pauses the host for 2 s while 15 calls wait.
    // Every answer takes 10 ms. When the pause ends, one call goes; each success lets one more
    // out, so 1, then 2, then 4, then 8 go, one round trip apart.
    let api = Api::with(vec![status_with(429, &[("retry-after", "2")])]).with_latency(ms(10));
    let svc = RateLimitLayer::adaptive_only().layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("a")).await.unwrap();
    let calls: Vec<_> = (0..15)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let t = api.since(start);
    let mut want = vec![Duration::ZERO];
    for (round, n) in [1, 2, 4, 8].into_iter().enumerate() {
        want.extend(std::iter::repeat_n(ms(2_010 + 10 * round as u64), n));
    }
    assert_eq!(t, want);
}

#[tokio::test(start_paused = true)]
async fn slow_start_stops_at_a_new_429_and_starts_again_from_one() {
    // The first call after the pause gets another 429 (1 s): the 7 still waiting stay in line
    // until it ends, then leave by slow start again.
    let api = Api::with(vec![
        status_with(429, &[("retry-after", "2")]),
        status_with(429, &[("retry-after", "1")]),
    ])
    .with_latency(ms(10));
    let svc = RateLimitLayer::adaptive_only().layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("a")).await.unwrap();
    let calls: Vec<_> = (0..8)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let t = api.since(start);
    // 0: the first 429. 2.01 s: the probe, another 429 (answered at 2.02 s, pausing to 3.02 s).
    // Then 1, 2, 4 one round trip apart.
    let mut want = vec![Duration::ZERO, ms(2_010)];
    for (round, n) in [1, 2, 4].into_iter().enumerate() {
        want.extend(std::iter::repeat_n(ms(3_020 + 10 * round as u64), n));
    }
    assert_eq!(t, want);
}

#[tokio::test(start_paused = true)]
async fn a_release_pace_spaces_the_waiting_calls_in_time() {
    let api = Api::with(vec![status_with(429, &[("retry-after", "2")])]);
    let svc = RateLimitLayer::adaptive_only()
        .with_release_pace(ms(100))
        .layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("a")).await.unwrap();
    let calls: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let t = api.since(start);
    let want: Vec<Duration> = std::iter::once(Duration::ZERO)
        .chain((0..5).map(|i| ms(2_000 + 100 * i)))
        .collect();
    assert_eq!(t, want);
}

#[tokio::test(start_paused = true)]
async fn a_release_pace_of_zero_lets_the_waiting_calls_go_together() {
    let api = Api::with(vec![status_with(429, &[("retry-after", "2")])]);
    let svc = RateLimitLayer::adaptive_only()
        .with_release_pace(Duration::ZERO)
        .layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("a")).await.unwrap();
    let calls: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let t = api.since(start);
    assert_eq!(t[0], Duration::ZERO);
    assert!(t[1..].iter().all(|d| *d == ms(2_000)), "{t:?}");
}

#[tokio::test(start_paused = true)]
async fn a_hundred_aborted_waiters_leave_no_debt() {
    // Quota 20/s, burst 5: the burst goes at once, 100 callers wait in line, then all are
    // aborted. The next call waits one interval (50 ms), not the 100 abandoned slots (5 s).
    let api = Api::default();
    let svc = RateLimitLayer::new(Quota::per_second(20).unwrap().with_burst(5).unwrap())
        .layer(api.service());
    let start = Instant::now();
    for _ in 0..5 {
        svc.clone().oneshot(get("a")).await.unwrap();
    }
    let waiters: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    settle().await;
    for w in &waiters {
        w.abort();
    }
    for w in waiters {
        assert!(w.await.unwrap_err().is_cancelled());
    }
    assert_eq!(api.times().len(), 5, "no aborted call reached the API");

    svc.clone().oneshot(get("a")).await.unwrap();
    let t = api.since(start);
    assert_eq!(t[5], ms(50), "the next call waited {:?}", t[5]);
}

#[tokio::test(start_paused = true)]
async fn max_wait_counts_the_calls_in_line_not_the_abandoned_ones() {
    let api = Api::default();
    let layer = RateLimitLayer::new(Quota::per_second(10).unwrap());
    let svc = layer.clone().layer(api.service());
    svc.clone().oneshot(get("a")).await.unwrap();
    let waiters: Vec<_> = (0..30)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    settle().await;
    // 30 ahead: a call that may wait 2 s is refused at once, with the wait it would have.
    let short = layer
        .clone()
        .with_max_wait(Duration::from_secs(2))
        .layer(api.service());
    let start = Instant::now();
    let err = short.clone().oneshot(get("a")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(
        err.downcast_ref::<RateLimited>().unwrap().retry_after(),
        ms(3_100)
    );
    // Once they are gone, the same call fits.
    for w in &waiters {
        w.abort();
    }
    settle().await;
    short.oneshot(get("a")).await.unwrap();
    assert_eq!(start.elapsed(), ms(100));
}

#[tokio::test(start_paused = true)]
async fn the_line_is_first_come_first_served_and_moves_up_when_one_leaves() {
    let api = Api::default();
    let svc = RateLimitLayer::new(Quota::per_second(10).unwrap()).layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("a")).await.unwrap();
    let mut waiters = Vec::new();
    for i in 0..6 {
        let req = Request::get(format!("http://a/{i}")).body(()).unwrap();
        waiters.push(tokio::spawn(svc.clone().oneshot(req)));
        settle().await;
    }
    // The second in line gives up before its turn: the ones behind it move up.
    tokio::time::sleep(ms(50)).await;
    waiters.remove(1).abort();
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    let t = api.since(start);
    let want: Vec<Duration> = (0..6).map(|i| ms(100 * i)).collect();
    assert_eq!(t, want);
    assert_eq!(
        api.uris(),
        ["/orders", "/0", "/2", "/3", "/4", "/5"].map(|p| format!("http://a{p}"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_pause_past_every_deadline_fails_the_waiting_calls_when_it_arrives() {
    // Five calls wait for slots; a 429 asking for 60 s arrives at 50 ms: with max_wait 5 s,
    // none can make it, and each learns so at 50 ms, not at its slot time.
    let api = Api::with(vec![status_with(429, &[("retry-after", "60")])]).with_latency(ms(50));
    let svc = RateLimitLayer::new(Quota::per_second(10).unwrap())
        .with_max_wait(Duration::from_secs(5))
        .layer(api.service());
    let start = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(get("a")));
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let err = svc.oneshot(get("a")).await.unwrap_err();
                (Instant::now(), err.downcast::<RateLimited>().unwrap())
            })
        })
        .collect();
    first.await.unwrap().unwrap();
    for w in waiters {
        let (at, err) = w.await.unwrap();
        assert_eq!(at - start, ms(50));
        assert_eq!(err.retry_after(), Duration::from_secs(60));
    }
    assert_eq!(api.times().len(), 1);
}

/// A quota store in this process (GCRA on a `DirectLimiter`) that counts the slots given back.
#[derive(Debug)]
struct Store {
    gcra: DirectLimiter,
    released: AtomicU32,
}

impl Store {
    fn new(quota: Quota) -> Arc<Self> {
        Arc::new(Self {
            gcra: DirectLimiter::new(quota),
            released: AtomicU32::new(0),
        })
    }
}

impl RemoteQuota for Store {
    fn reserve(&self, _key: &str, max_wait: Duration) -> BoxFuture<Result<Reserve, BoxError>> {
        let decided = match self.gcra.reserve(max_wait) {
            Ok(wait) => Reserve::Granted { wait },
            Err(e) => Reserve::Denied {
                retry_after: e.retry_after(),
            },
        };
        Box::pin(std::future::ready(Ok(decided)))
    }

    fn release(&self, _key: &str) -> BoxFuture<Result<(), BoxError>> {
        self.released.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::ready(Ok(())))
    }
}

#[tokio::test(start_paused = true)]
async fn with_a_remote_store_the_calls_after_a_pause_ask_again_and_leave_at_its_pace() {
    let quota = Quota::per_second(10).unwrap();
    let store = Store::new(quota);
    let api = Api::with(vec![status_with(429, &[("retry-after", "2")])]).with_latency(ms(50));
    let svc = RateLimitLayer::new(quota)
        .with_remote(store.clone())
        .layer(api.service());
    let start = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    settle().await;
    let t = api.since(start);
    assert_eq!(t[0], Duration::ZERO);
    let want: Vec<Duration> = (0..5).map(|i| ms(2_050 + 100 * i)).collect();
    assert_eq!(t[1..], want[..]);
    // The five slots granted before the pause were given back.
    assert_eq!(store.released.load(Ordering::SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn with_a_remote_store_clearing_a_pause_releases_the_calls_waiting_for_it() {
    let quota = Quota::per_second(10).unwrap();
    let store = Store::new(quota);
    let api = Api::with(vec![status_with(429, &[("retry-after", "60")])]);
    let (layer, handle) = RateLimitLayer::new(quota)
        .with_remote(store.clone())
        .with_max_wait(Duration::from_secs(120))
        .pair();
    let svc = layer.layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("a")).await.unwrap();
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(handle.waiting("a"), 3);
    assert_eq!(handle.clear_pause("a"), Some(Duration::from_secs(59)));
    for c in calls {
        c.await.unwrap().unwrap();
    }
    // They ask the store at 1 s, which spaces them one interval apart.
    assert_eq!(api.since(start), [ms(0), ms(1_000), ms(1_100), ms(1_200)]);
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_it_waits_for_a_remote_slot_gives_it_back() {
    let quota = Quota::per_second(10).unwrap();
    let store = Store::new(quota);
    let api = Api::default();
    let svc = RateLimitLayer::new(quota)
        .with_remote(store.clone())
        .layer(api.service());
    svc.clone().oneshot(get("a")).await.unwrap();
    let waiters: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    settle().await;
    for w in waiters {
        w.abort();
    }
    settle().await;
    assert_eq!(store.released.load(Ordering::SeqCst), 3);
    assert_eq!(api.times().len(), 1);
}

/// A server that admits one call per 100 ms and answers any other with a bare 429 (what nginx's
/// `limit_req rate=10r/s` without a burst does), answering in 1 ms.
#[derive(Clone, Default)]
struct Strict {
    last: Arc<std::sync::Mutex<Option<Instant>>>,
    sent: Arc<std::sync::Mutex<Vec<(Instant, u16)>>>,
}

impl Strict {
    fn service(
        &self,
    ) -> impl tower::Service<
        Request<()>,
        Response = http::Response<()>,
        Error = BoxError,
        Future = impl Send,
    > + Clone {
        let this = self.clone();
        tower::service_fn(move |_req: Request<()>| {
            let this = this.clone();
            async move {
                let now = Instant::now();
                let status = {
                    let mut last = this.last.lock().unwrap();
                    if last.is_none_or(|l| now.duration_since(l) >= ms(100)) {
                        *last = Some(now);
                        200
                    } else {
                        429
                    }
                };
                this.sent.lock().unwrap().push((now, status));
                tokio::time::sleep(ms(1)).await;
                Ok(http::Response::builder().status(status).body(()).unwrap())
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn without_a_quota_a_bare_429_teaches_the_key_a_pace() {
    let server = Strict::default();
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(server.service());
    let start = Instant::now();
    // 20 callers at once, each trying up to 4 times, 300 ms apart (a retry layer's backoff).
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                for _ in 0..4 {
                    let res = svc.clone().oneshot(get("a")).await.unwrap();
                    if res.status() == 200 {
                        return true;
                    }
                    tokio::time::sleep(ms(300)).await;
                }
                false
            })
        })
        .collect();
    for c in calls {
        assert!(c.await.unwrap(), "every call succeeds within 4 attempts");
    }
    let took = start.elapsed();
    let sent = server.sent.lock().unwrap().clone();
    let first_wave = sent.iter().filter(|(t, _)| *t == start).count();
    let later_429 = sent.iter().filter(|(t, s)| *t > start && *s == 429).count();
    assert_eq!(first_wave, 20);
    assert!(
        later_429 <= 4,
        "a 429 now and then, not a line of them: {later_429} in {sent:?}"
    );
    // 19 calls at (about) the server's 10 per second after a 1 s pause.
    assert!(took <= ms(4_500), "{took:?}");
    // The pace is visible through the handle; a cleared pause forgets it: calls go at once.
    let pace = handle.learned_pace("a").expect("a pace was learned");
    assert!(pace >= ms(80) && pace <= ms(250), "{pace:?}");
    assert_eq!(handle.learned_pace("b"), None);
    handle.clear_pause("a");
    assert_eq!(handle.learned_pace("a"), None);
    let t0 = Instant::now();
    tokio::time::sleep(ms(200)).await;
    let before = server.sent.lock().unwrap().len();
    let (a, b) = tokio::join!(svc.clone().oneshot(get("a")), svc.clone().oneshot(get("a")));
    let _ = (a.unwrap(), b.unwrap());
    let sent = server.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), before + 2);
    assert!(
        sent[before..].iter().all(|(t, _)| *t == t0 + ms(200)),
        "both sent at once: {:?}",
        &sent[before..]
    );
}

#[tokio::test(start_paused = true)]
async fn a_later_slot_granted_by_a_remote_store_is_slept_out_and_not_reported_as_a_wait() {
    // Quota 10/s, burst 1, in the store: the first call goes at once, the next two are granted
    // slots 100 ms away and sleep them out; `on_event` reports waits in line only (its docs,
    // and metrics.md: a wait a shared quota grants is not counted).
    let quota = Quota::per_second(10).unwrap();
    let store = Store::new(quota);
    let api = Api::with(vec![]);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let svc = RateLimitLayer::new(quota)
        .with_remote(store.clone())
        .on_event(move |e| {
            if let sturdy_core::events::Event::RateLimitWaited { wait, .. } = e {
                log.lock().unwrap().push(*wait);
            }
        })
        .layer(api.service());
    let start = Instant::now();
    for _ in 0..3 {
        svc.clone().oneshot(get("a")).await.unwrap();
    }
    assert_eq!(api.since(start), vec![Duration::ZERO, ms(100), ms(200)]);
    assert!(seen.lock().unwrap().is_empty());
}
