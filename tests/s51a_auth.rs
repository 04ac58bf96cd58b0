#![cfg(feature = "full")]
//! s51a: the numbers of auth.md and RELIABILITY.md for the OAuth2 token cache (refresh at
//! `expiry - min(60 s, lifetime / 2)`, 1 h without `expires_in`, 24 h at most, backoff 1 s
//! doubling to 60 s, the 1 MiB replay limit) and of the rate-limit `Quota`/`DirectLimiter`,
//! observed at their boundaries on paused time; and the client stack under tower's `Buffer` and
//! `ConcurrencyLimit(1)` driven by a kept service where a default matters.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::core::{find, RateLimited};
use sturdy::ratelimit::{DirectLimiter, Quota, RateLimitLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::s51a_util::{get, resp, Api};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A token endpoint that answers from `answer(n)` (status, body) and logs when each request came.
#[derive(Clone)]
struct Tokens {
    at: Arc<Mutex<Vec<Instant>>>,
    answer: Arc<dyn Fn(usize) -> (u16, String) + Send + Sync>,
}

impl Tokens {
    fn new(answer: impl Fn(usize) -> (u16, String) + Send + Sync + 'static) -> Self {
        Self {
            at: Arc::default(),
            answer: Arc::new(answer),
        }
    }
    fn with_expiry(expires: Option<&'static str>) -> Self {
        Self::new(move |n| {
            let body = match expires {
                Some(e) => {
                    format!(r#"{{"access_token":"tok{n}","token_type":"Bearer","expires_in":{e}}}"#)
                }
                None => format!(r#"{{"access_token":"tok{n}","token_type":"Bearer"}}"#),
            };
            (200, body)
        })
    }
    fn count(&self) -> usize {
        self.at.lock().unwrap().len()
    }
    fn credentials(&self) -> ClientCredentials {
        let me = self.clone();
        let svc = tower::service_fn(move |_r: Request<Full<Bytes>>| {
            let me = me.clone();
            async move {
                let n = {
                    let mut at = me.at.lock().unwrap();
                    at.push(Instant::now());
                    at.len() - 1
                };
                let (status, body) = (me.answer)(n);
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap(),
                )
            }
        });
        ClientCredentials::new(svc, "https://auth.test/oauth/token", "id", "secret").unwrap()
    }
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_micros(1)).await;
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Calls through `svc` at `t` (from `start`) and returns how many token requests were made by
/// then (after letting a background refresh start).
async fn fetches_after_call_at<S>(svc: &S, tokens: &Tokens, start: Instant, t: Duration) -> usize
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>> + Clone,
    S::Error: std::fmt::Debug,
{
    tokio::time::sleep_until(start + t).await;
    let res = svc.clone().oneshot(get("http://api.test/x")).await.unwrap();
    assert_eq!(res.status(), 200);
    settle().await;
    tokens.count()
}

/// auth.md: "The cache: reused until `expiry - min(60 s, lifetime / 2)`, then refreshed in the
/// background"; "`expires_in` missing => 1 h, ... huge => 24 h". For each lifetime, a call one
/// second before the refresh point uses the cached token, one second after starts one refresh.
#[tokio::test(start_paused = true)]
async fn s51a_token_refresh_points() {
    for (expires, refresh_at) in [
        (Some("3600"), secs(3600 - 60)),
        (Some("100"), secs(50)),
        (Some("121"), secs(61)),
        (Some("120"), secs(60)),
        (None, secs(3600 - 60)),
        (Some("1000000000"), secs(86_400 - 60)),
        (Some("1e400"), secs(86_400 - 60)),
    ] {
        let tokens = Tokens::with_expiry(expires);
        let api = Api::always(200, &[]);
        let svc = AuthLayer::oauth2(tokens.credentials()).layer(api.service::<Full<Bytes>>());
        let start = Instant::now();
        assert_eq!(
            fetches_after_call_at(&svc, &tokens, start, Duration::ZERO).await,
            1
        );
        assert_eq!(
            fetches_after_call_at(&svc, &tokens, start, refresh_at - secs(1)).await,
            1,
            "expires_in {expires:?}: refreshed before {refresh_at:?}"
        );
        assert_eq!(
            fetches_after_call_at(&svc, &tokens, start, refresh_at + secs(1)).await,
            2,
            "expires_in {expires:?}: not refreshed after {refresh_at:?}"
        );
    }
}

/// auth.md: "zero or negative => a clear error" (RELIABILITY.md: "zero, negative or not a
/// number: an error, no refresh loop").
#[tokio::test(start_paused = true)]
async fn s51a_token_expires_in_zero_negative_nan_are_errors() {
    for bad in ["0", "-1", "\"soon\"", "-1e400"] {
        let tokens = Tokens::with_expiry(Some(bad));
        let api = Api::always(200, &[]);
        let svc = AuthLayer::oauth2(tokens.credentials()).layer(api.service::<Full<Bytes>>());
        let err = svc
            .clone()
            .oneshot(get("http://api.test/x"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("expires_in"), "{bad}: {err}");
        assert_eq!(api.count(), 0);
        let n = tokens.count();
        // No refresh loop: nothing more is requested while nobody calls.
        tokio::time::sleep(secs(600)).await;
        assert_eq!(tokens.count(), n, "{bad}: a refresh loop");
    }
}

/// auth.md: "a failed refresh ... backs off (1 s doubling to 60 s) instead of hammering the
/// endpoint, and a caller with no valid token during the backoff gets the last error at once".
/// A caller every 100 ms against an endpoint that always answers 503: requests 1 s, 2 s, 4 s ...
/// apart, at most 60 s.
#[tokio::test(start_paused = true)]
async fn s51a_token_failure_backoff_1s_doubling_to_60s() {
    let tokens = Tokens::new(|_| (503, r#"{"error":"unavailable"}"#.to_owned()));
    let api = Api::always(200, &[]);
    let svc = AuthLayer::oauth2(tokens.credentials()).layer(api.service::<Full<Bytes>>());
    let start = Instant::now();
    while start.elapsed() < secs(300) {
        let t0 = Instant::now();
        let err = svc
            .clone()
            .oneshot(get("http://api.test/x"))
            .await
            .unwrap_err();
        assert!(t0.elapsed() <= ms(1), "waited {:?}: {err}", t0.elapsed());
        tokio::time::sleep(ms(100)).await;
    }
    let at = tokens.at.lock().unwrap().clone();
    let gaps: Vec<u64> = at
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect();
    // Each gap is the backoff, rounded up to the caller's next 100 ms tick.
    let want = [1000u64, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000];
    assert!(gaps.len() >= want.len(), "{gaps:?}");
    for (g, w) in gaps.iter().zip(want) {
        assert!(*g >= w && *g <= w + 100, "gaps {gaps:?}, want {want:?}");
    }
    assert_eq!(api.count(), 0);
}

/// auth.md: "401 from the API: ... replayed once, if its body can be: a body whose size is known
/// and within `.with_replay_limit(bytes)` \[1 MiB\] is kept for the replay; a larger one ... is
/// sent once and its 401 returned as is".
#[tokio::test(start_paused = true)]
async fn s51a_auth_replay_limit_1mib_exactly() {
    const MIB: usize = 1024 * 1024;
    for (size, sends) in [(MIB, 2usize), (MIB + 1, 1)] {
        let tokens = Tokens::with_expiry(Some("3600"));
        let api = Api::new(|n, _| Ok(resp(if n == 0 { 401 } else { 200 }, &[])));
        let svc = AuthLayer::oauth2(tokens.credentials()).layer(api.service::<Full<Bytes>>());
        let req = Request::put("http://api.test/blob")
            .body(Full::new(Bytes::from(vec![b'x'; size])))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(api.count(), sends, "body of {size} bytes");
        assert_eq!(res.status(), if sends == 2 { 200 } else { 401 });
        if sends == 2 {
            let log = api.log.lock().unwrap();
            assert_eq!(log[1].2.len(), MIB, "the replay carries the whole body");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quota and DirectLimiter (ratelimit.md, gcra rustdoc)
// ---------------------------------------------------------------------------------------------

/// ratelimit.md: "`Quota::per_second(10)?.with_burst(5)?` ... 5 calls go at once, then one every
/// 100 ms"; `DirectLimiter::check` refuses with the time until a slot; `reserve(max_wait)`.
#[tokio::test(start_paused = true)]
async fn s51a_quota_burst_and_interval_exactly() {
    let q = Quota::per_second(10).unwrap().with_burst(5).unwrap();
    assert_eq!((q.interval(), q.burst()), (ms(100), 5));
    let l = DirectLimiter::new(q);
    for i in 0..5 {
        assert!(l.check().is_ok(), "call {i} of the burst");
    }
    let e = l.check().unwrap_err();
    assert_eq!(e.retry_after(), ms(100));
    tokio::time::advance(ms(99)).await;
    assert_eq!(l.check().unwrap_err().retry_after(), ms(1));
    tokio::time::advance(ms(1)).await;
    assert!(l.check().is_ok());
    // reserve: the next slot is 100 ms away.
    assert!(l.reserve(ms(99)).is_err());
    assert_eq!(l.reserve(ms(100)).unwrap(), ms(100));
    assert_eq!(l.reserve(ms(200)).unwrap(), ms(200));
}

/// gcra rustdoc: errors "When `calls` is 0 or `period` is zero"; "When `burst` is 0"; "A spacing
/// longer than 30 years is enforced as 30 years ..., a spacing under one nanosecond as one
/// nanosecond (`Quota::per_second(u32::MAX)`...)".
#[tokio::test(start_paused = true)]
async fn s51a_quota_validation_and_extremes() {
    assert!(Quota::new(0, secs(1)).is_err());
    assert!(Quota::new(1, Duration::ZERO).is_err());
    assert!(Quota::per_second(0).is_err());
    assert!(Quota::per_minute(0).is_err());
    assert!(Quota::per_second(1).unwrap().with_burst(0).is_err());
    assert_eq!(Quota::per_minute(1).unwrap().interval(), secs(60));
    assert_eq!(
        Quota::per_second(u32::MAX).unwrap().interval(),
        Duration::from_nanos(1)
    );
    let far = Quota::new(1, Duration::MAX).unwrap();
    assert_eq!(far.interval(), sturdy::core::clock::FAR);
    let l = DirectLimiter::new(far.with_burst(3).unwrap());
    for _ in 0..3 {
        l.check().unwrap();
    }
    let e = l.check().unwrap_err();
    assert!(e.retry_after() > secs(86_400 * 365 * 29), "{e}");
    // A burst of u32::MAX at one per 30 years: no panic, and not unlimited.
    let l = DirectLimiter::new(
        Quota::new(1, Duration::MAX)
            .unwrap()
            .with_burst(u32::MAX)
            .unwrap(),
    );
    let mut ok = 0;
    while l.check().is_ok() && ok < 1000 {
        ok += 1;
    }
    assert!((1..1000).contains(&ok), "{ok} calls at once");
}

/// ratelimit.md: "`with_default_pause(..)`" is "at most `max_pause`" (rustdoc), and
/// `Duration::MAX` settings are "read as about 30 years; never a panic" (RELIABILITY.md).
#[tokio::test(start_paused = true)]
async fn s51a_ratelimit_hostile_settings() {
    let api = Api::always(429, &[]);
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_default_pause(Duration::MAX)
        .with_max_wait(Duration::MAX)
        .pair();
    let svc = layer.layer(api.service::<Full<Bytes>>());
    let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    assert_eq!(
        handle.pause("a.test"),
        Some(secs(300)),
        "capped at max_pause"
    );
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_pause(Duration::MAX)
        .pair();
    let api = Api::always(429, &[("retry-after", "99999999999999999999")]);
    let svc = layer
        .with_max_wait(Duration::ZERO)
        .layer(api.service::<Full<Bytes>>());
    let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    let err = svc.oneshot(get("http://a.test/x")).await.unwrap_err();
    assert!(find::<RateLimited>(&*err).is_some());
    // The pause itself (584 years here) is checked against "about 30 years" in
    // s51a_more::s51a_duration_max_pause_reads_as_30_years.
    assert!(handle.pause("a.test").is_some());
}

// ---------------------------------------------------------------------------------------------
// Composition where a default matters
// ---------------------------------------------------------------------------------------------

/// README.md: the client "can sit under a `Buffer` or over a `ConcurrencyLimit`, driven by
/// `oneshot` or a kept `ready().await?.call(req)`". A kept service under `Buffer(1)` over
/// `ConcurrencyLimit(1)`: a 429 with `Retry-After: 1` paces the next calls by the default pause
/// (no deadlock, no stranded permit), and a 503 retried after the default backoff.
#[tokio::test(start_paused = true)]
async fn s51a_kept_service_under_buffer_over_limit_defaults() {
    let api = Api::new(|n, _| {
        Ok(match n {
            0 => resp(429, &[("retry-after", "1")]),
            2 => resp(503, &[]),
            _ => resp(200, &[]),
        })
    });
    let inner = tower::ServiceBuilder::new()
        .concurrency_limit(1)
        .service(api.service::<Full<Bytes>>());
    let client = ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(7))
        .build(inner);
    let mut kept = tower::buffer::Buffer::new(client, 1);
    let start = Instant::now();
    for _ in 0..3 {
        let res = kept
            .ready()
            .await
            .unwrap()
            .call(get("http://a.test/x"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let t = api.offsets(start);
    assert_eq!(t.len(), 5, "3 calls, 2 retries: {t:?}");
    // The 429's retry after its Retry-After (1 s to 1.2 s).
    assert!(t[1] >= secs(1) && t[1] <= ms(1200), "{t:?}");
    // The 503's retry after the backoff's first sleep (250 ms to 750 ms).
    let gap = t[3] - t[2];
    assert!(gap >= ms(250) && gap <= ms(750), "{t:?}");
}

/// The attempt timeout of `ClientBuilder` is 30 s; under `ConcurrencyLimit(1)` a timed-out
/// attempt gives its permit back, so the kept service's next call goes through.
#[tokio::test(start_paused = true)]
async fn s51a_kept_service_attempt_timeout_frees_the_permit() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    let http = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let n = h2.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                std::future::pending::<()>().await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    });
    let inner = tower::ServiceBuilder::new()
        .concurrency_limit(1)
        .service(http);
    let mut kept = ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(1))
        .build(inner);
    let start = Instant::now();
    let res = kept
        .ready()
        .await
        .unwrap()
        .call(get("http://a.test/x"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let took = start.elapsed();
    assert!(
        took >= secs(30) + ms(250) && took <= secs(30) + ms(750),
        "{took:?}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}
