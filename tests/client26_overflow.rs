//! Handles on keys past the bound of kept state, read literally: circuit.md's
//! `handle.force_open(host)` ("Isolates `key`: its breaker stays open until `force_close`") for a
//! host that shares the overflow breaker; ratelimit.md's `handle.pause(key)` ("How long calls to
//! `key` stay paused from now; `None` when they are not paused") and `clear_pause(key)` for a key
//! that shares the overflow limiter; coalesce.md's `handle.in_flight(key)` for a host that shares
//! the overflow table. Paused time.
#![cfg(feature = "full")]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::{BoxError, CircuitOpen};
use sturdy::ratelimit::RateLimitLayer;
use tower::{Layer, ServiceExt};

type Req = Request<Full<Bytes>>;

fn get(host: &str, path: &str) -> Req {
    Request::get(format!("http://{host}{path}"))
        .body(Full::default())
        .unwrap()
}

/// `/fail` answers 503, `/429` answers 429 with `Retry-After: 10`, anything else 200.
fn api(
) -> impl tower::Service<Req, Response = Response<Full<Bytes>>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(|r: Req| async move {
        let mut b = Response::builder();
        b = match r.uri().path() {
            "/fail" => b.status(503),
            "/429" => b.status(429).header("retry-after", "10"),
            _ => b.status(200),
        };
        Ok::<_, BoxError>(b.body(Full::<Bytes>::default()).unwrap())
    })
}

/// Two kept breakers (each with a failure streak, so not forgotten); `c.test` and `d.test`
/// share the overflow breaker. Isolating `c.test` leaves `d.test` alone.
#[tokio::test(start_paused = true)]
async fn client26_force_open_isolates_only_its_key_past_the_bound() {
    let (layer, h) = CircuitBreakerLayer::new()
        .with_consecutive_failures(50)
        .with_max_breakers(2)
        .pair();
    let svc = layer.layer(api());
    for host in ["a.test", "b.test"] {
        let _ = svc.clone().oneshot(get(host, "/fail")).await.unwrap();
    }
    for host in ["c.test", "d.test"] {
        svc.clone().oneshot(get(host, "/")).await.unwrap();
    }
    h.force_open("c.test");
    let c = svc.clone().oneshot(get("c.test", "/")).await;
    assert!(
        c.as_ref().err().is_some_and(|e| e.is::<CircuitOpen>()),
        "c.test was forced open: {:?}",
        c.map(|r| r.status())
    );
    let d = svc.clone().oneshot(get("d.test", "/")).await;
    assert!(
        d.is_ok(),
        "forcing c.test open refused d.test too: {}",
        d.err().map(|e| e.to_string()).unwrap_or_default()
    );
    let a = svc.clone().oneshot(get("a.test", "/")).await;
    assert!(a.is_ok(), "a.test refused");
}

/// One kept limiter (`a.test`); `b.test` shares the overflow limiter, which a 429 pauses for
/// 10 s. The handle answers for `b.test` what its calls live: paused, and clearable.
#[tokio::test(start_paused = true)]
async fn client26_pause_of_a_key_past_the_bound_is_read_and_cleared() {
    let (layer, h) = RateLimitLayer::adaptive_only()
        .with_max_keys(1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = layer.layer(api());
    svc.clone().oneshot(get("a.test", "/")).await.unwrap();
    let res = svc.clone().oneshot(get("b.test", "/429")).await.unwrap();
    assert_eq!(res.status(), 429);
    // Calls to b.test are held now (refused at once with a zero max_wait).
    let held = svc.clone().oneshot(get("b.test", "/")).await;
    assert!(held.is_err(), "b.test was paused by its 429");
    let mut wrong = Vec::new();
    let p = h.pause("b.test");
    if p.is_none_or(|p| p <= Duration::from_secs(9)) {
        wrong.push(format!(
            "calls to b.test are paused, but pause(b.test) = {p:?} (paused() = {:?})",
            h.paused()
        ));
    }
    let cleared = h.clear_pause("b.test");
    let after = svc.clone().oneshot(get("b.test", "/")).await;
    if cleared.is_none() || after.is_err() {
        wrong.push(format!(
            "clear_pause(b.test) = {cleared:?}, then a call to b.test: {}",
            after
                .err()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "sent".into())
        ));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// coalesce.md: "`handle.in_flight(key)`: Shared calls in flight to `key` (the host) now", for a
/// host that shares the overflow table (`with_max_hosts(1)`, another host's call in flight).
#[tokio::test(start_paused = true)]
async fn client26_in_flight_of_a_host_past_the_bound() {
    use sturdy::coalesce::CoalesceLayer;
    let slow = tower::service_fn(|_r: Req| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    });
    let (layer, h) = CoalesceLayer::new().with_max_hosts(1).pair();
    let svc = layer.layer(slow);
    let a = tokio::spawn(svc.clone().oneshot(get("a.test", "/")));
    tokio::task::yield_now().await;
    let c = tokio::spawn(svc.clone().oneshot(get("c.test", "/")));
    let c2 = tokio::spawn(svc.clone().oneshot(get("c.test", "/")));
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_millis(10)).await;
    let (ia, ic) = (h.in_flight("a.test"), h.in_flight("c.test"));
    let _ = (a.await, c.await, c2.await);
    assert_eq!(
        h.stats().upstream(),
        2,
        "the two c.test calls were coalesced"
    );
    assert_eq!((ia, ic), (1, 1), "in_flight(a.test), in_flight(c.test)");
}

/// ratelimit.md: `handle.waiting(key)` "calls in line" for a key that shares the overflow
/// limiter: two calls to `b.test` wait out its pause.
#[tokio::test(start_paused = true)]
async fn client26_waiting_of_a_key_past_the_bound() {
    let (layer, h) = RateLimitLayer::adaptive_only().with_max_keys(1).pair();
    let svc = layer.layer(api());
    svc.clone().oneshot(get("a.test", "/")).await.unwrap();
    let _ = svc.clone().oneshot(get("b.test", "/429")).await.unwrap();
    let w1 = tokio::spawn(svc.clone().oneshot(get("b.test", "/")));
    let w2 = tokio::spawn(svc.clone().oneshot(get("b.test", "/")));
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_millis(10)).await;
    let n = h.waiting("b.test");
    w1.abort();
    w2.abort();
    assert_eq!(n, 2, "waiting(b.test) while two calls to it wait");
}

/// metrics.md: "Past a layer's bound on kept keys (...), the hosts beyond it share one overflow
/// state, whose key is `*`; the events of that state (a pause, a breaker's transition) carry
/// `server.address` `*` and no `server.port`". The pause a call to an overflow key met, and the
/// overflow breaker's opening, are labelled `*`; nothing else is.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn client26_overflow_events_are_labelled_as_the_overflow_state() {
    use metrics_util::debugging::DebuggingRecorder;
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let svc = RateLimitLayer::adaptive_only()
        .with_max_keys(1)
        .layer(api());
    svc.clone().oneshot(get("a.test", "/")).await.unwrap();
    let _ = svc.clone().oneshot(get("b.test", "/429")).await.unwrap();
    let svc = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_max_breakers(1)
        .layer(api());
    let _ = svc.clone().oneshot(get("a.test", "/fail")).await.unwrap();
    let _ = svc.clone().oneshot(get("c.test", "/fail")).await.unwrap();
    let mut odd = Vec::new();
    let mut overflow = Vec::new();
    for (ck, _, _, _) in snap.snapshot().into_vec() {
        let (_, key) = ck.into_parts();
        let address = key
            .labels()
            .find(|l| l.key() == "server.address")
            .map(|l| l.value().to_owned());
        match address.as_deref() {
            Some("*") => {
                overflow.push(key.name().to_owned());
                if key.labels().any(|l| l.key() == "server.port") {
                    odd.push(format!("{} has a server.port beside *", key.name()));
                }
            }
            Some("a.test" | "b.test" | "c.test") | None => {}
            Some(other) => odd.push(format!("{} server.address={other}", key.name())),
        }
    }
    overflow.sort();
    overflow.dedup();
    assert!(odd.is_empty(), "{odd:?}");
    for name in ["sturdy.ratelimit.pauses", "sturdy.circuit.transitions"] {
        assert!(
            overflow.iter().any(|n| n == name),
            "{name} under *: {overflow:?}"
        );
    }
}

/// ratelimit.md "A quota of your own": `with_max_keys(1)` and a quota of 1 call per second per
/// host. Calling another host must not hand `a.test` a fresh quota: a second call to `a.test`
/// within the second is still refused (RELIABILITY.md: only idle limiters are forgotten).
#[tokio::test(start_paused = true)]
async fn client26_a_busy_quota_is_not_forgotten_for_another_host() {
    use sturdy::ratelimit::Quota;
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_keys(1)
        .with_max_wait(Duration::ZERO)
        .layer(api());
    svc.clone().oneshot(get("a.test", "/")).await.unwrap();
    tokio::time::advance(Duration::from_millis(100)).await;
    let _ = svc.clone().oneshot(get("b.test", "/")).await;
    tokio::time::advance(Duration::from_millis(100)).await;
    let again = svc.clone().oneshot(get("a.test", "/")).await;
    assert!(
        again.is_err(),
        "a second call to a.test 200 ms after the first went through a 1/s quota"
    );
}

/// The pace `a.test` learned from a bare 429 outlives calls to another host while the pace is
/// in force (`with_max_keys(1)`).
#[tokio::test(start_paused = true)]
async fn client26_a_learned_pace_is_kept_while_another_host_is_called() {
    let (layer, h) = RateLimitLayer::adaptive_only().with_max_keys(1).pair();
    let svc = layer.layer(tower::service_fn(|r: Req| async move {
        let s = if r.uri().path() == "/bare" { 429 } else { 200 };
        Ok::<_, BoxError>(
            Response::builder()
                .status(s)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    }));
    let _ = svc.clone().oneshot(get("a.test", "/bare")).await.unwrap();
    tokio::time::advance(Duration::from_millis(1100)).await;
    let before = h.learned_pace("a.test");
    assert!(before.is_some());
    let _ = svc.clone().oneshot(get("b.test", "/")).await;
    assert_eq!(
        h.learned_pace("a.test"),
        before,
        "forgotten by a call to b.test"
    );
}

/// `force_close(key)` ("Resets key's breaker to closed") on a host past the bound: the breaker
/// the failing overflow hosts opened is not reset by a call about another host.
#[tokio::test(start_paused = true)]
async fn client26_force_close_of_one_overflow_host_keeps_the_others_open() {
    let (layer, h) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_max_breakers(1)
        .pair();
    let svc = layer.layer(api());
    let _ = svc.clone().oneshot(get("a.test", "/fail")).await.unwrap();
    // d.test fails: the overflow breaker it shares opens.
    let _ = svc.clone().oneshot(get("d.test", "/fail")).await.unwrap();
    assert!(svc.clone().oneshot(get("d.test", "/")).await.is_err());
    h.force_close("c.test");
    let d = svc.clone().oneshot(get("d.test", "/")).await;
    assert!(
        d.is_err(),
        "force_close(c.test) reset the breaker d.test's failures opened"
    );
}

/// The same label rule for the coalescing layer past `with_max_hosts(1)`: a call to `c.test`
/// that joins an identical one is counted under `c.test`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn client26_coalesced_overflow_calls_are_labelled_with_the_host_called() {
    use metrics_util::debugging::DebuggingRecorder;
    use sturdy::coalesce::CoalesceLayer;
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let slow = tower::service_fn(|_r: Req| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    });
    let svc = CoalesceLayer::new().with_max_hosts(1).layer(slow);
    let a = svc.clone().oneshot(get("a.test", "/"));
    let c1 = svc.clone().oneshot(get("c.test", "/"));
    let c2 = svc.clone().oneshot(get("c.test", "/"));
    let (a, c1, c2) = tokio::join!(a, c1, c2);
    assert!(a.is_ok() && c1.is_ok() && c2.is_ok());
    let mut labels = Vec::new();
    for (ck, _, _, v) in snap.snapshot().into_vec() {
        let (_, key) = ck.into_parts();
        if key.name() == "sturdy.coalesce.coalesced" {
            if let metrics_util::debugging::DebugValue::Counter(n) = v {
                if n > 0 {
                    for l in key.labels() {
                        if l.key() == "server.address" {
                            labels.push(l.value().to_owned());
                        }
                    }
                }
            }
        }
    }
    assert_eq!(labels, ["c.test"]);
}
