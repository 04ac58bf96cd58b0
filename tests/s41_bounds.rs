//! s41: the retry and client rows of docs/RELIABILITY.md's "Bounds" (retry budgets per host,
//! bodies kept for a replay, the reported wait) and what a dropped call does, through the public
//! `sturdy::retry::RetryLayer` and `sturdy::ClientBuilder`, on paused time in process.

#![cfg(feature = "full")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::{BoxError, Delivery, RateLimited};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const MIB: usize = 1024 * 1024;

/// Counts requests per host (and the body bytes of each); answers hosts starting with `fail`
/// 503 always, others 503 once then 200, or per `first`.
#[derive(Clone, Default)]
struct Hosts {
    seen: Arc<Mutex<HashMap<String, Vec<usize>>>>,
}

impl Hosts {
    fn count(&self, host: &str) -> usize {
        self.seen.lock().unwrap().get(host).map_or(0, Vec::len)
    }
    fn service<B>(
        &self,
        retry_after: Option<&'static str>,
    ) -> impl tower::Service<
        Request<B>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
           + 'static
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let me = self.clone();
        service_fn(move |r: Request<B>| {
            let me = me.clone();
            async move {
                let host = r.uri().host().unwrap_or("").to_owned();
                let body = http_body_util::BodyExt::collect(r.into_body())
                    .await
                    .map_err(Into::into)?
                    .to_bytes();
                let n = {
                    let mut m = me.seen.lock().unwrap();
                    let v = m.entry(host.clone()).or_default();
                    v.push(body.len());
                    v.len()
                };
                let status = if host.starts_with("fail") || n == 1 {
                    503
                } else {
                    200
                };
                let mut b = Response::builder().status(status);
                if let (503, Some(ra)) = (status, retry_after) {
                    b = b.header("retry-after", ra);
                }
                Ok::<_, BoxError>(b.body(Full::new(Bytes::new())).unwrap())
            }
        })
    }
}

fn get(host: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{host}/x"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// RELIABILITY.md, "Bounds": "keys (hosts) remembered by limiters, breakers, retry budgets |
/// 1,024 each; ... (retry budgets are never forgotten: past 1,024 hosts, new hosts share one
/// budget)"; retry.md: "Budget: one budget per host". With a reserve of 10 retries per host
/// (`with_budget(10 s, 1, 0.0)`), 1,024 hosts that each used their budget once, then (after
/// every one went idle past the budget's window) three more hosts: the first spends the shared
/// budget, so the next two get no retry; an early host still has its own.
#[tokio::test(start_paused = true)]
async fn s41_retry_budgets_past_1024_hosts_share_one_and_are_never_forgotten() {
    let hosts = Hosts::default();
    let layer = RetryLayer::new()
        .with_budget(secs(10), 1, 0.0)
        .unwrap()
        .with_seed(5);
    let svc = layer.layer(hosts.service::<Full<Bytes>>(None));
    let calls: Vec<_> = (0..1024)
        .map(|i| svc.clone().oneshot(get(&format!("h{i}.test"))))
        .collect();
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(hosts.count("h5.test"), 2);
    tokio::time::advance(secs(60)).await;
    // The first new host past the bound: 10 retries in its (shared) budget.
    for _ in 0..4 {
        let _ = svc.clone().oneshot(get("fail-a.test")).await.unwrap();
    }
    assert_eq!(
        hosts.count("fail-a.test"),
        4 + 10,
        "fail-a: 4 calls and the reserve's 10 retries"
    );
    for h in ["fail-b.test", "fail-c.test"] {
        let _ = svc.clone().oneshot(get(h)).await.unwrap();
        assert_eq!(
            hosts.count(h),
            1,
            "{h}, past 1,024 hosts, got retries of a budget of its own"
        );
    }
    // A host among the first 1,024 still has its own budget.
    let _ = svc.clone().oneshot(get("h5.test")).await.unwrap();
    assert_eq!(hosts.count("h5.test"), 3, "h5 lost its budget");
}

/// RELIABILITY.md, "Bounds": "request bodies kept for a replay | 1 MiB (retry ...); larger or
/// unbounded ones are sent once"; retry.md, "When": a `Retry-After` "on a call that is not retried
/// (... a body not kept for a replay ...) is not slept: on a 429 or a 503 the call fails at once
/// with a `RateLimited { retry_after }`". A PUT of exactly 1 MiB is retried with the same body;
/// one byte more is sent once, and with `Retry-After: 1` fails at once with `RateLimited`.
#[tokio::test(start_paused = true)]
async fn s41_replay_body_limit_is_one_mib_inclusive() {
    let put = |host: &str, n: usize| {
        Request::put(format!("http://{host}/x"))
            .body(Full::new(Bytes::from(vec![b'z'; n])))
            .unwrap()
    };
    let hosts = Hosts::default();
    let svc = RetryLayer::new().layer(hosts.service::<Full<Bytes>>(None));
    let res = svc.clone().oneshot(put("eq.test", MIB)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(hosts.seen.lock().unwrap()["eq.test"], vec![MIB, MIB]);
    let res = svc
        .clone()
        .oneshot(put("over.test", MIB + 1))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(hosts.seen.lock().unwrap()["over.test"], vec![MIB + 1]);

    let hosts = Hosts::default();
    let svc = RetryLayer::new().layer(hosts.service::<Full<Bytes>>(Some("1")));
    let t0 = Instant::now();
    let err = svc.oneshot(put("ra.test", MIB + 1)).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO, "{err}");
    assert_eq!(hosts.count("ra.test"), 1);
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited");
    assert_eq!(rl.retry_after(), secs(1));
}

/// RELIABILITY.md, "Bounds": "larger or unbounded ones are sent once". A GET whose body is a
/// stream with no size hint, answered 503, is sent once.
#[tokio::test(start_paused = true)]
async fn s41_unbounded_body_is_sent_once() {
    let hosts = Hosts::default();
    let svc = RetryLayer::new().layer(hosts.service::<axum::body::Body>(None));
    let stream = futures_util::stream::iter(vec![
        Ok::<_, Infallible>(Bytes::from_static(b"ab")),
        Ok(Bytes::from_static(b"cd")),
    ]);
    let r = Request::put("http://stream.test/x")
        .body(axum::body::Body::from_stream(stream))
        .unwrap();
    let res = svc.oneshot(r).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(hosts.seen.lock().unwrap()["stream.test"], vec![4]);
}

/// RELIABILITY.md, "Bounds": "a `Retry-After` longer than the client sleeps | the call fails at
/// once with `RateLimited`, whose wait is the server's capped at 5 min
/// (`sturdy_retry::MAX_REPORTED_WAIT`, or `max_retry_after` when longer)". A 503 asking 20 min:
/// reported 5 min by default ("retry after 5m"), 10 min under `with_max_retry_after(10 min)`.
#[tokio::test(start_paused = true)]
async fn s41_reported_wait_is_capped_at_five_minutes_or_max_retry_after() {
    assert_eq!(sturdy::retry::MAX_REPORTED_WAIT, secs(300));
    for (layer, want) in [
        (RetryLayer::new(), secs(300)),
        (RetryLayer::new().with_max_retry_after(secs(600)), secs(600)),
    ] {
        let hosts = Hosts::default();
        let svc = layer.layer(hosts.service::<Full<Bytes>>(Some("1200")));
        let err = svc.oneshot(get("fail.test")).await.unwrap_err();
        let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited");
        assert_eq!(rl.retry_after(), want, "{err}");
        assert!(
            err.to_string()
                .ends_with(&format!("retry after {}m", want.as_secs() / 60)),
            "{err}"
        );
    }
}

/// retry.md, "What the caller gets": "`report()` gives the number of attempts (sent on, so 0
/// when every try was refused) ..." and "`...; the request was not sent, so it is safe to send
/// again` only when no attempt could have reached the server"; "An open circuit breaker below
/// ... without a deadline the call fails at once". Through `ClientBuilder`, a POST to a host
/// whose breaker is forced open fails at once, unsent, with 0 attempts.
#[tokio::test(start_paused = true)]
async fn s41_every_try_refused_reports_zero_attempts_and_not_sent() {
    let hosts = Hosts::default();
    let (breaker, handle) = CircuitBreakerLayer::new().pair();
    handle.force_open("shut.test");
    let client = ClientBuilder::new()
        .with_circuit_breaker(breaker)
        .build(hosts.service::<Full<Bytes>>(None));
    let t0 = Instant::now();
    let err = client
        .oneshot(
            Request::post("http://shut.test/orders")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(hosts.count("shut.test"), 0);
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).expect("a sturdy error");
    let rep = e.report().expect("a CallReport");
    assert_eq!(rep.attempts(), 0, "{err}");
    assert_eq!(rep.delivery(), Delivery::NotSent);
    assert!(
        err.to_string()
            .ends_with("the request was not sent, so it is safe to send again"),
        "{err}"
    );
}

/// Cancellation (retry.md, "When"; idempotency.md, "Client"): a keyed POST answered 503 with
/// `Retry-After: 2` through `ClientBuilder`, dropped while it sleeps, is never sent again, and
/// the next call waits only for its own `Retry-After`.
#[tokio::test(start_paused = true)]
async fn s41_call_dropped_during_its_retry_sleep_sends_nothing_more() {
    let hosts = Hosts::default();
    let client = ClientBuilder::new()
        .without_rate_limit()
        .build(hosts.service::<Full<Bytes>>(Some("2")));
    let post = || {
        Request::post("http://fail.test/orders")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let call = tokio::spawn(client.clone().oneshot(post()));
    tokio::time::sleep(secs(1)).await;
    assert_eq!(hosts.count("fail.test"), 1);
    call.abort();
    let _ = call.await;
    tokio::time::sleep(secs(30)).await;
    assert_eq!(hosts.count("fail.test"), 1, "a dropped call was sent again");
    let t0 = Instant::now();
    let res = client.oneshot(get("ok.test")).await.unwrap();
    assert_eq!(res.status(), 200);
    // ok.test answers 503 `Retry-After: 2` once: its own wait, nothing of the dropped call's.
    assert_eq!(hosts.count("ok.test"), 2);
    assert!(
        t0.elapsed() <= Duration::from_millis(2_400),
        "{:?}",
        t0.elapsed()
    );
}

/// A server for the kept-service tests: `/a` answers 503 `Retry-After: 1` the first time, then
/// 200; `/b` takes 3 s. It records when each request starts and the most in flight at once.
#[derive(Clone, Default)]
struct Lanes {
    starts: Arc<Mutex<Vec<(String, Instant)>>>,
    in_flight: Arc<Mutex<(usize, usize)>>,
}

impl Lanes {
    fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>>
                     + Send
                     + 'static,
    > + Clone
           + Send
           + Sync
           + 'static {
        let me = self.clone();
        service_fn(move |r: Request<Full<Bytes>>| {
            let me = me.clone();
            async move {
                let path = r.uri().path().to_owned();
                let n_a = {
                    let mut s = me.starts.lock().unwrap();
                    s.push((path.clone(), Instant::now()));
                    s.iter().filter(|(p, _)| p == "/a").count()
                };
                {
                    let mut f = me.in_flight.lock().unwrap();
                    f.0 += 1;
                    f.1 = f.1.max(f.0);
                }
                if path == "/b" {
                    tokio::time::sleep(secs(3)).await;
                }
                me.in_flight.lock().unwrap().0 -= 1;
                let mut b = Response::builder();
                if path == "/a" && n_a == 1 {
                    b = b.status(503).header("retry-after", "1");
                }
                Ok::<_, BoxError>(b.body(Full::new(Bytes::new())).unwrap())
            }
        })
    }
    fn starts(&self, path: &str) -> Vec<Duration> {
        let s = self.starts.lock().unwrap();
        let t0 = s[0].1;
        s.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, t)| *t - t0)
            .collect()
    }
}

/// retry.md, "Where it may sit": "`poll_ready` is the inner service's, and the first attempt goes
/// to the service `poll_ready` made ready; later attempts wait for readiness again on that same
/// service ... It works over `ConcurrencyLimit`, `GlobalConcurrencyLimit` and `Buffer`, driven by
/// `oneshot` or by a kept service (`ready().await?.call(req)`)." A kept retry service over
/// `ConcurrencyLimit(1)`, alone and under a `Buffer`: call A (503, `Retry-After: 1`), then call B
/// (3 s) through the same kept service while A sleeps; A's retry waits for B's place, both end,
/// and the server never has two at once.
#[tokio::test(start_paused = true)]
async fn s41_kept_retry_service_over_concurrency_limit_and_buffer() {
    use tower::limit::ConcurrencyLimitLayer;
    use tower::Service;

    for buffered in [false, true] {
        let lanes = Lanes::default();
        let limited = ConcurrencyLimitLayer::new(1).layer(lanes.service());
        let mut svc: tower::util::BoxCloneService<
            Request<Full<Bytes>>,
            Response<Full<Bytes>>,
            BoxError,
        > = if buffered {
            let inner = tower::buffer::Buffer::new(limited, 8);
            tower::util::BoxCloneService::new(RetryLayer::new().layer(inner))
        } else {
            tower::util::BoxCloneService::new(RetryLayer::new().layer(limited))
        };
        svc.ready().await.unwrap();
        let a = tokio::spawn(
            svc.call(
                Request::get("http://api.example.com/a")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            ),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let b = tokio::time::timeout(secs(1), svc.ready())
            .await
            .expect("the kept service was not ready while A slept")
            .unwrap()
            .call(
                Request::get("http://api.example.com/b")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            );
        let b = tokio::spawn(b);
        let ra = tokio::time::timeout(secs(30), a)
            .await
            .expect("A hung")
            .unwrap();
        let rb = tokio::time::timeout(secs(30), b)
            .await
            .expect("B hung")
            .unwrap();
        assert_eq!(ra.unwrap().status(), 200, "buffered {buffered}");
        assert_eq!(rb.unwrap().status(), 200, "buffered {buffered}");
        let a_at = lanes.starts("/a");
        assert_eq!(a_at.len(), 2, "buffered {buffered}: {a_at:?}");
        assert!(
            a_at[1] >= secs(3),
            "buffered {buffered}: A's retry at {:?}, inside B's place",
            a_at[1]
        );
        assert_eq!(lanes.in_flight.lock().unwrap().1, 1, "buffered {buffered}");
    }
}

/// retry.md, "When": "One ... with no attempt left, or on a call that is not retried (... a spent
/// retry budget) is not slept: on a 429 or a 503 the call fails at once with a `RateLimited {
/// retry_after }` in its error chain"; "What the caller gets": "so the caller always learns how
/// long the server asked it to wait". With the host's budget spent, a GET answered 429
/// `Retry-After: 2` fails at once with `RateLimited` of 2 s; so does one with a single attempt.
#[tokio::test(start_paused = true)]
async fn s41_spent_budget_or_no_attempt_left_fails_at_once_with_the_wait() {
    let hosts = Hosts::default();
    let limited = service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(
            Response::builder()
                .status(429)
                .header("retry-after", "2")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    });
    // The same host, so the same (spent) budget: one layer over a service that routes by path.
    let both = {
        let failing = hosts.service::<Full<Bytes>>(None);
        service_fn(move |r: Request<Full<Bytes>>| {
            let failing = failing.clone();
            async move {
                if r.uri().path() == "/limited" {
                    limited.oneshot(r).await
                } else {
                    failing.oneshot(r).await
                }
            }
        })
    };
    let svc = RetryLayer::new()
        .with_budget(secs(10), 1, 0.0)
        .unwrap()
        .with_seed(11)
        .layer(both);
    // Spend the host's budget: call until a call gets no retry (no time passes after it).
    let mut spent = false;
    for _ in 0..20 {
        let before = hosts.count("fail.test");
        let _ = svc.clone().oneshot(get("fail.test")).await.unwrap();
        if hosts.count("fail.test") == before + 1 {
            spent = true;
            break;
        }
    }
    assert!(spent, "setup: the budget was never spent");
    let t0 = Instant::now();
    let err = svc
        .clone()
        .oneshot(
            Request::get("http://fail.test/limited")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .expect_err("a 429 with Retry-After on a spent budget came back as a response");
    assert_eq!(t0.elapsed(), Duration::ZERO, "{err}");
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited");
    assert_eq!(rl.retry_after(), secs(2));

    let err = RetryLayer::new()
        .with_max_attempts(1)
        .layer(hosts.service::<Full<Bytes>>(Some("2")))
        .oneshot(get("fail.test"))
        .await
        .expect_err("a 503 with Retry-After and no attempt left came back as a response");
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited");
    assert_eq!(rl.retry_after(), secs(2));
}
