//! Hedging (`sturdy-hedge`, docs/guides/hedge.md) against real wire faults: a raw server on
//! loopback that stalls, resets before and after reading, and refuses.
use crate::faults32_util::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, Delivery};
use sturdy::hedge::{HedgeHandle, HedgeLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

const DELAY: Duration = Duration::from_millis(40);

/// A hedge layer that hedges after a fixed 40 ms once 5 samples were seen, with a full budget.
fn layer() -> (HedgeLayer, HedgeHandle) {
    HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(DELAY, DELAY)
        .with_budget(1.0, 10)
        .unwrap()
        .pair()
}

/// Fast GETs to `/warm` so the host has a delay.
async fn warm<S>(svc: &S, raw: &Raw)
where
    S: Service<Request<Full<Bytes>>, Error = BoxError> + Clone,
    S::Response: std::fmt::Debug,
{
    for _ in 0..12 {
        svc.clone().oneshot(get(&raw.url("/warm"))).await.unwrap();
    }
}

/// `/warm` answers at once; `/slow`'s first request stalls (answers after 5 s unless the client
/// goes), later ones answer at once. Other paths: `other`.
async fn first_stalls(other: impl Fn(&Seen) -> Act + Send + Sync + 'static) -> Raw {
    let n = Arc::new(AtomicUsize::new(0));
    raw(Opts::default(), move |s| match s.path.as_str() {
        "/warm" => ok_after(0, "warm"),
        "/slow" => {
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                ok_after(5_000, "first")
            } else {
                ok_after(0, "second")
            }
        }
        _ => other(s),
    })
    .await
}

fn host_stats(h: &HedgeHandle) -> sturdy::hedge::HedgeStats {
    let all = h.all();
    assert_eq!(
        all.len(),
        1,
        "one host: {:?}",
        all.iter().map(|a| &a.0).collect::<Vec<_>>()
    );
    all[0].1
}

#[tokio::test]
async fn stalled_get_is_hedged_and_the_loser_connection_is_closed() {
    let raw = first_stalls(|_| status(404)).await;
    let (layer, handle) = layer();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    warm(&svc, &raw).await;
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(4),
        "hedged GET",
        svc.clone().oneshot(get(&raw.url("/slow"))),
    )
    .await
    .unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"second", "the hedge answered first");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(raw.count("GET", "/slow"), 2, "the first copy and one hedge");
    // The loser was dropped: hyper closes its connection, which the server sees.
    until("the loser's connection closed by the client", || {
        raw.client_closed() == 1
    })
    .await;
    let st = host_stats(&handle);
    assert_eq!((st.hedges(), st.hedge_wins()), (1, 1));
}

#[tokio::test]
async fn a_stalled_head_and_a_stalled_body_are_hedged_too() {
    // The first copy gets half a head (hyper cannot answer yet): the hedge must still win.
    let n = Arc::new(AtomicUsize::new(0));
    let raw = raw(Opts::default(), move |s| match s.path.as_str() {
        "/warm" => ok_after(0, "warm"),
        _ => {
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                Act::StallHeaders
            } else {
                ok_after(0, "second")
            }
        }
    })
    .await;
    let (layer, handle) = layer();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    warm(&svc, &raw).await;
    let res = bounded(
        Duration::from_secs(4),
        "hedged GET",
        svc.clone().oneshot(get(&raw.url("/head"))),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    until("the stalled head's connection closed", || {
        raw.client_closed() == 1
    })
    .await;
    assert_eq!(host_stats(&handle).hedge_wins(), 1);
}

#[tokio::test]
async fn no_duplicate_for_methods_the_docs_do_not_hedge() {
    // Every request to /u stalls 300 ms, far past the 40 ms delay: a hedgeable one would be
    // copied. POST, PUT, DELETE, PATCH (with or without a key, keyed requests off) are not.
    let raw = raw(Opts::default(), |s| match s.path.as_str() {
        "/warm" => ok_after(0, "warm"),
        _ => ok_after(300, "late"),
    })
    .await;
    let (layer, handle) = layer();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    warm(&svc, &raw).await;
    for m in ["POST", "PUT", "DELETE", "PATCH"] {
        let path = format!("/u-{m}");
        let res = svc.clone().oneshot(req(m, &raw.url(&path))).await.unwrap();
        assert_eq!(res.status(), 200);
        let mut keyed = req(m, &raw.url(&format!("{path}-keyed")));
        keyed
            .headers_mut()
            .insert("idempotency-key", "k-123".parse().unwrap());
        svc.clone().oneshot(keyed).await.unwrap();
        assert_eq!(raw.count(m, &path), 1, "{m} without a key was duplicated");
        assert_eq!(
            raw.count(m, &format!("{path}-keyed")),
            1,
            "{m} with a key (keyed off) was duplicated"
        );
    }
    // A control: a GET there is hedged.
    svc.clone().oneshot(get(&raw.url("/u-GET"))).await.unwrap();
    assert_eq!(
        raw.count("GET", "/u-GET"),
        2,
        "the control GET was not hedged"
    );
    assert_eq!(host_stats(&handle).hedges(), 1);
}

#[tokio::test]
async fn keyed_requests_are_hedged_only_with_a_real_key() {
    let raw = raw(Opts::default(), |s| match s.path.as_str() {
        "/warm" => ok_after(0, "warm"),
        _ => ok_after(300, "late"),
    })
    .await;
    let (l, _handle) = layer();
    let svc = ServiceBuilder::new()
        .layer(l.with_keyed_requests(true))
        .service(http());
    warm(&svc, &raw).await;
    // No key, a blank key, a key of tabs: never hedged.
    svc.clone()
        .oneshot(req("POST", &raw.url("/none")))
        .await
        .unwrap();
    for (path, v) in [("/blank", ""), ("/spaces", "  \t ")] {
        let mut r = req("POST", &raw.url(path));
        r.headers_mut()
            .insert("idempotency-key", v.parse().unwrap());
        svc.clone().oneshot(r).await.unwrap();
    }
    // A real key: hedged, and both copies carry the same key and body.
    let mut r = req("POST", &raw.url("/keyed"));
    r.headers_mut()
        .insert("idempotency-key", "k-1".parse().unwrap());
    svc.clone().oneshot(r).await.unwrap();
    assert_eq!(raw.count("POST", "/none"), 1);
    assert_eq!(
        raw.count("POST", "/blank"),
        1,
        "a blank key names no operation"
    );
    assert_eq!(
        raw.count("POST", "/spaces"),
        1,
        "a key of spaces names no operation"
    );
    let keyed: Vec<Seen> = raw
        .seen()
        .into_iter()
        .filter(|s| s.path == "/keyed")
        .collect();
    assert_eq!(keyed.len(), 2, "the keyed POST is hedged");
    assert!(keyed
        .iter()
        .all(|s| s.header("idempotency-key") == Some("k-1") && s.body == b"{\"a\":1}"));
}

#[tokio::test]
async fn client_builder_posts_are_never_hedged() {
    // ClientBuilder puts an idempotency key on every POST; hedging keyed requests is off by
    // default, so a slow POST is sent once.
    let raw = raw(Opts::default(), |s| match s.path.as_str() {
        "/warm" => ok_after(0, "warm"),
        _ => ok_after(300, "late"),
    })
    .await;
    let (l, handle) = layer();
    let client = ClientBuilder::new()
        .with_hedge(l)
        .with_attempt_timeout(Duration::from_secs(5))
        .build(http());
    for _ in 0..12 {
        client
            .clone()
            .oneshot(get(&raw.url("/warm")))
            .await
            .unwrap();
    }
    let res = client
        .clone()
        .oneshot(req("POST", &raw.url("/orders")))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let posts: Vec<Seen> = raw
        .seen()
        .into_iter()
        .filter(|s| s.path == "/orders")
        .collect();
    assert_eq!(
        posts.len(),
        1,
        "a POST through ClientBuilder was duplicated"
    );
    assert!(posts[0].header("idempotency-key").is_some());
    client.clone().oneshot(get(&raw.url("/g"))).await.unwrap();
    assert_eq!(raw.count("GET", "/g"), 2, "control: a slow GET is hedged");
    assert_eq!(host_stats(&handle).hedges(), 1);
}

#[tokio::test]
async fn a_first_copy_reset_before_the_delay_fails_the_call_and_sends_no_hedge() {
    let raw = raw(Opts::default(), |s| match s.path.as_str() {
        "/warm" => ok_after(0, "warm"),
        _ => Act::ResetAfterRead(Duration::ZERO),
    })
    .await;
    let (l, handle) = layer();
    let svc = ServiceBuilder::new().layer(l).service(http());
    warm(&svc, &raw).await;
    let err = svc.clone().oneshot(get(&raw.url("/r"))).await.unwrap_err();
    assert_eq!(
        delivery(&*err),
        Delivery::MaybeProcessed,
        "{}",
        chain(&*err)
    );
    tokio::time::sleep(DELAY * 3).await;
    assert_eq!(raw.count_path("/r"), 1, "no hedge after the call failed");
    assert_eq!(host_stats(&handle).hedges(), 0);
}

#[tokio::test]
async fn both_copies_reset_after_read_the_call_says_maybe_processed() {
    // The first copy is reset 100 ms after it was read, the hedge (at 40 ms) at once.
    let n = Arc::new(AtomicUsize::new(0));
    let raw = raw(Opts::default(), move |s| match s.path.as_str() {
        "/warm" => ok_after(0, "warm"),
        _ => {
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                Act::ResetAfterRead(Duration::from_millis(100))
            } else {
                Act::ResetAfterRead(Duration::ZERO)
            }
        }
    })
    .await;
    let (l, handle) = layer();
    let svc = ServiceBuilder::new().layer(l).service(http());
    warm(&svc, &raw).await;
    let start = Instant::now();
    let err = bounded(
        Duration::from_secs(4),
        "both reset",
        svc.clone().oneshot(get(&raw.url("/r2"))),
    )
    .await
    .unwrap_err();
    assert!(
        start.elapsed() >= Duration::from_millis(90),
        "waited for the other copy"
    );
    assert_eq!(raw.count_path("/r2"), 2);
    assert_eq!(
        delivery(&*err),
        Delivery::MaybeProcessed,
        "{}",
        chain(&*err)
    );
    assert_eq!(host_stats(&handle).hedge_wins(), 0);
}

#[tokio::test]
async fn a_refused_hedge_after_a_reset_first_copy_never_says_not_sent() {
    // The first copy reaches the server and is reset 60 ms later (may have been processed);
    // the hedge (due at 40 ms) waits 150 ms, then finds the port closed (refused: not sent),
    // later. The call must not claim "not sent".
    let raw = raw(Opts::default(), |s| match s.path.as_str() {
        "/warm" => ok_after(0, "warm"),
        _ => Act::ResetAfterRead(Duration::from_millis(60)),
    })
    .await;
    let refused = closed_port().await;
    let n = Arc::new(AtomicUsize::new(0));
    let h = http();
    let inner = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let h = h.clone();
        let hedge_copy = req.uri().path() == "/x" && n.fetch_add(1, Ordering::SeqCst) == 1;
        async move {
            if hedge_copy {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let uri = format!("http://{refused}/x");
                let r = Request::get(uri).body(Full::default()).unwrap();
                return h.request(r).await.map_err(BoxError::from);
            }
            h.request(req).await.map_err(BoxError::from)
        }
    });
    let (l, handle) = layer();
    let svc = ServiceBuilder::new().layer(l).service(inner);
    warm(&svc, &raw).await;
    let err = bounded(
        Duration::from_secs(4),
        "reset then refused",
        svc.clone().oneshot(get(&raw.url("/x"))),
    )
    .await
    .unwrap_err();
    assert_eq!(host_stats(&handle).hedges(), 1, "the hedge was sent");
    assert_eq!(
        delivery(&*err),
        Delivery::MaybeProcessed,
        "one copy may have been processed: {}",
        chain(&*err)
    );
}

#[tokio::test]
async fn dropping_a_hedged_call_closes_both_connections() {
    // Both copies stall; the caller gives up after 200 ms: both connections must be closed.
    let raw = raw(Opts::default(), |s| match s.path.as_str() {
        "/warm" => ok_after(0, "warm"),
        _ => ok_after(10_000, "never"),
    })
    .await;
    let (l, handle) = layer();
    let svc = ServiceBuilder::new().layer(l).service(http());
    warm(&svc, &raw).await;
    let r = tokio::time::timeout(
        Duration::from_millis(200),
        svc.clone().oneshot(get(&raw.url("/both"))),
    )
    .await;
    assert!(r.is_err());
    assert_eq!(raw.count_path("/both"), 2);
    until("both stalled connections closed", || {
        raw.client_closed() == 2
    })
    .await;
    assert_eq!(host_stats(&handle).hedges(), 1);
}

#[tokio::test]
async fn a_server_closing_idle_keepalive_does_not_break_hedged_calls() {
    // The server closes a keep-alive connection idle for 30 ms; calls 60 ms apart find their
    // pooled connection closed. Every GET must still succeed, none is hedged needlessly twice.
    let raw = raw(
        Opts {
            idle_close: Some(Duration::from_millis(30)),
            ..Opts::default()
        },
        |_| ok_after(0, "ok"),
    )
    .await;
    let (l, handle) = layer();
    let svc = ServiceBuilder::new().layer(l).service(http());
    warm(&svc, &raw).await;
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let res = svc
            .clone()
            .oneshot(get(&raw.url(&format!("/k{i}"))))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {}", chain(&*e)));
        assert_eq!(res.status(), 200);
    }
    assert!(host_stats(&handle).calls() >= 22);
}

#[tokio::test]
async fn many_tasks_over_buffer_with_hedging_get_every_answer_once() {
    // 40 tasks drive a kept Buffer(Hedge(client)) with ready().call(); every 5th request stalls
    // on its first copy. Every task gets its own answer (its path echoed back).
    let seen_first = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let raw = raw(Opts::default(), move |s| {
        let first = seen_first.lock().unwrap().insert(s.path.clone());
        let stall = s.path.ends_with("0") || s.path.ends_with("5");
        if s.path.starts_with("/warm") {
            ok_after(0, "warm")
        } else if stall && first {
            ok_after(5_000, "stalled")
        } else {
            ok_after(0, &s.path)
        }
    })
    .await;
    let (l, handle) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(DELAY, DELAY)
        .with_budget(1.0, 100)
        .unwrap()
        .pair();
    let inner = ServiceBuilder::new().layer(l).service(http());
    warm(&inner, &raw).await;
    let svc = tower::buffer::Buffer::new(inner, 64);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut svc = svc.clone();
        let url = raw.url(&format!("/t{i}"));
        tasks.push(tokio::spawn(async move {
            let res = svc.ready().await.unwrap().call(get(&url)).await.unwrap();
            let b = res.into_body().collect().await.unwrap().to_bytes();
            (i, String::from_utf8_lossy(&b).into_owned())
        }));
    }
    for t in tasks {
        let (i, body) = bounded(Duration::from_secs(8), "task", t).await.unwrap();
        assert_eq!(body, format!("/t{i}"));
    }
    assert_eq!(host_stats(&handle).hedge_wins(), 8);
    until("every loser closed", || raw.client_closed() == 8).await;
}

#[test]
fn hostile_settings_are_validated_or_clamped() {
    for p in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        assert!(
            HedgeLayer::new().with_percentile(p).is_err(),
            "percentile {p}"
        );
    }
    for r in [-0.1, 1.1, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        assert!(HedgeLayer::new().with_budget(r, 10).is_err(), "ratio {r}");
    }
    // Absurd but accepted values must not panic when used.
    let _ = HedgeLayer::new()
        .with_delay_bounds(Duration::MAX, Duration::ZERO)
        .with_window(Duration::MAX)
        .with_min_samples(u64::MAX)
        .with_max_hosts(0)
        .with_budget(1.0, u32::MAX)
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn huge_delay_bounds_and_window_do_not_panic_on_the_call_path() {
    // Duration::MAX as delay and window: arithmetic on instants must not overflow.
    let (l, handle) = HedgeLayer::new()
        .with_min_samples(1)
        .with_delay_bounds(Duration::MAX, Duration::MAX)
        .with_window(Duration::MAX)
        .pair();
    let svc = ServiceBuilder::new().layer(l).service(tower::service_fn(
        |_r: Request<Full<Bytes>>| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, BoxError>(Response::new(()))
        },
    ));
    for _ in 0..50 {
        svc.clone()
            .oneshot(get("http://h.example/x"))
            .await
            .unwrap();
    }
    let st = handle.stats("h.example").unwrap();
    assert_eq!((st.calls(), st.hedges()), (50, 0));
}

#[tokio::test(start_paused = true)]
async fn zero_window_and_zero_delay_bounds_keep_working() {
    // A zero window is taken as 1 ms; a zero delay bound: hedges at once, within the budget.
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let (l, handle) = HedgeLayer::new()
        .with_min_samples(1)
        .with_delay_bounds(Duration::ZERO, Duration::ZERO)
        .with_window(Duration::ZERO)
        .with_budget(0.0, 3)
        .unwrap()
        .pair();
    let svc = ServiceBuilder::new().layer(l).service(tower::service_fn(
        move |_r: Request<Full<Bytes>>| {
            n2.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<_, BoxError>(Response::new(()))
            }
        },
    ));
    for _ in 0..100 {
        svc.clone()
            .oneshot(get("http://h.example/x"))
            .await
            .unwrap();
    }
    let st = handle.stats("h.example").unwrap();
    assert!(
        st.hedges() <= 3,
        "budget 0 ratio, burst 3: {} hedges",
        st.hedges()
    );
    assert_eq!(n.load(Ordering::SeqCst) as u64, 100 + st.hedges());
}
