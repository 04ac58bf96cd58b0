//! Events read against docs/guides/metrics.md and the `Event` rustdoc: `RateLimitRefused` ("a call
//! was refused without being sent, because it would have waited longer than allowed") for every
//! way the limiter refuses a call, and `TokenFailed`'s `retry_in` ("How long the source waits
//! before it asks the endpoint again") and `keeping_current`. Paused time, in-process services.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::ClientCredentials;
use sturdy::core::events::Event;
use sturdy::core::{find, BoxError, CallOptions, RateLimited};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::ClientBuilder;
use tower::{Layer, Service, ServiceExt};

type Req = Request<Full<Bytes>>;

fn req(path: &str) -> Req {
    Request::get(format!("http://api.test{path}"))
        .body(Full::default())
        .unwrap()
}

/// `/429?ms=N&ra=S` answers 429 (with `Retry-After: S` unless empty) after N ms; else 200.
fn api() -> impl Service<Req, Response = Response<Full<Bytes>>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(|req: Req| async move {
        if req.uri().path() == "/429" {
            let q = req.uri().query().unwrap_or("").to_string();
            let mut ms = 0u64;
            let mut ra = String::new();
            for kv in q.split('&') {
                if let Some(v) = kv.strip_prefix("ms=") {
                    ms = v.parse().unwrap();
                }
                if let Some(v) = kv.strip_prefix("ra=") {
                    ra = v.to_string();
                }
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let mut b = Response::builder().status(429);
            if !ra.is_empty() {
                b = b.header("retry-after", ra);
            }
            return Ok::<_, BoxError>(b.body(Full::default()).unwrap());
        }
        Ok(Response::new(Full::default()))
    })
}

#[derive(Clone, Default)]
struct Refusals(Arc<Mutex<Vec<Duration>>>);

impl Refusals {
    fn hook(&self) -> impl Fn(&Event<'_>) + Send + Sync + 'static {
        let s = self.0.clone();
        move |e: &Event<'_>| {
            if let Event::RateLimitRefused { wait, .. } = e {
                s.lock().unwrap().push(*wait);
            }
        }
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

#[tokio::test(start_paused = true)]
async fn client26_refused_at_once_past_max_wait_is_an_event() {
    let r = Refusals::default();
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::ZERO)
        .on_event(r.hook())
        .layer(api());
    svc.clone().oneshot(req("/")).await.unwrap();
    assert!(svc.clone().oneshot(req("/")).await.is_err());
    assert_eq!(r.count(), 1);
}

/// A waiter told at once that a pause now lasts longer than its `max_wait`.
#[tokio::test(start_paused = true)]
async fn client26_waiter_told_by_a_longer_pause_is_an_event() {
    let r = Refusals::default();
    let svc = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(5))
        .on_event(r.hook())
        .layer(api());
    let a1 = tokio::spawn(svc.clone().oneshot(req("/429?ms=100&ra=2")));
    let a2 = tokio::spawn(svc.clone().oneshot(req("/429?ms=300&ra=60")));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let err = svc.clone().oneshot(req("/b")).await.unwrap_err();
    assert!(find::<RateLimited>(&*err).is_some(), "{err}");
    let _ = (a1.await, a2.await);
    assert_eq!(r.count(), 1, "{:?}", r.0.lock().unwrap());
}

/// Slow start: a waiter whose `max_wait` passes while released calls never answer.
#[tokio::test(start_paused = true)]
async fn client26_slow_start_waiter_past_max_wait_is_an_event() {
    let r = Refusals::default();
    let svc = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(3))
        .on_event(r.hook())
        .layer(api());
    let _ = svc.clone().oneshot(req("/429")).await.unwrap();
    // Released first when the 1 s pause ends; answers only after 60 s.
    let slow = tokio::spawn(svc.clone().oneshot(req("/429?ms=60000&ra=")));
    tokio::task::yield_now().await;
    let start = tokio::time::Instant::now();
    let err = svc.clone().oneshot(req("/b")).await.unwrap_err();
    assert!(find::<RateLimited>(&*err).is_some(), "{err}");
    assert!(start.elapsed() >= Duration::from_secs(3));
    slow.abort();
    assert_eq!(r.count(), 1, "{:?}", r.0.lock().unwrap());
}

/// In a `ClientBuilder` stack: a call whose turn comes after its deadline is refused at once
/// ("it is refused at once with `RateLimited` carrying the wait, and it was not sent").
#[tokio::test(start_paused = true)]
async fn client26_deadline_refusal_is_an_event() {
    let r = Refusals::default();
    let client = ClientBuilder::new()
        .with_rate_limit(
            RateLimitLayer::new(Quota::new(1, Duration::from_secs(10)).unwrap()).on_event(r.hook()),
        )
        .build(api());
    client.clone().oneshot(req("/")).await.unwrap();
    let mut late = req("/");
    late.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(2)));
    let err = client.clone().oneshot(late).await.unwrap_err();
    assert!(find::<RateLimited>(&*err).is_some(), "{err}");
    assert_eq!(r.count(), 1, "{:?}", r.0.lock().unwrap());
    let w = r.0.lock().unwrap()[0];
    assert!(
        w > Duration::from_secs(9) && w <= Duration::from_secs(10),
        "{w:?}"
    );
}

/// `TokenFailed`: `retry_in` is the backoff (1 s doubling to 60 s) and `keeping_current` says
/// whether a valid token stays in use.
#[tokio::test(start_paused = true)]
async fn client26_token_failed_events_carry_the_backoff() {
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    let endpoint = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let n = h.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(
                    r#"{"access_token":"t","token_type":"Bearer","expires_in":600}"#,
                )))
            } else {
                Ok(Response::builder()
                    .status(503)
                    .body(Full::<Bytes>::from("down"))
                    .unwrap())
            }
        }
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let c = ClientCredentials::new(endpoint, "https://auth.test/token", "id", "secret")
        .unwrap()
        .on_event(move |e: &Event<'_>| {
            if let Event::TokenFailed {
                retry_in,
                keeping_current,
                ..
            } = e
            {
                s.lock()
                    .unwrap()
                    .push((retry_in.as_secs(), *keeping_current));
            }
        });
    c.get().await.unwrap();
    // Refresh point: 600 - 60 s. Ask every 500 ms until well after expiry.
    tokio::time::advance(Duration::from_secs(541)).await;
    for _ in 0..(2 * 200) {
        let _ = c.get().await;
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_millis(500)).await;
    }
    let seen = seen.lock().unwrap().clone();
    let waits: Vec<u64> = seen.iter().map(|(w, _)| *w).collect();
    assert!(waits.len() >= 7, "{seen:?}");
    assert_eq!(&waits[..7], &[1, 2, 4, 8, 16, 32, 60], "{seen:?}");
    // Failures before 600 s keep the current token; later ones cannot.
    assert!(seen[0].1, "{seen:?}");
    assert!(!seen.last().unwrap().1, "{seen:?}");
}
