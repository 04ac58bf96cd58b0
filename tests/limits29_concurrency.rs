//! The adaptive concurrency limit as docs/guides/concurrency.md and the `sturdy-concurrency` docs
//! describe it: bounds, waiting and shedding, cancellation, composition with tower's layers.

#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use sturdy::concurrency::{AdaptiveConcurrencyLayer, Algorithm, ConcurrencyHandle, LimitReached};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, Delivery, ErrorKind};
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

fn get(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

/// An API that answers after `ms` with `status`, counting calls in flight and the peak.
#[derive(Clone, Default)]
struct Load {
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

fn slow_api(
    ms: u64,
    status: u16,
    load: Load,
) -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    service_fn(move |_req: Request<()>| {
        let load = load.clone();
        async move {
            let n = load.now.fetch_add(1, Ordering::SeqCst) + 1;
            load.peak.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            load.now.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(()).unwrap())
        }
    })
}

fn state(handle: &ConcurrencyHandle, key: &str) -> (usize, usize, usize) {
    let s = handle.state(key).expect("a limit for the key");
    (s.limit(), s.in_flight(), s.waiting())
}

fn limit_reached(err: &BoxError) -> &LimitReached {
    sturdy::core::find::<LimitReached>(&**err)
        .unwrap_or_else(|| panic!("a LimitReached in the chain: {err}"))
}

#[test]
fn defaults_and_bounds_are_as_documented() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    drop(layer);
    handle.set_limit("a.test", 0);
    assert_eq!(
        handle.limit("a.test"),
        Some(1),
        "taken into the bounds [1, 1000]"
    );
    handle.set_limit("a.test", 5_000);
    assert_eq!(handle.limit("a.test"), Some(1_000));
    let (_, handle) = AdaptiveConcurrencyLayer::new().with_limits(0, 0).pair();
    handle.set_limit("b.test", 7);
    assert_eq!(
        handle.limit("b.test"),
        Some(1),
        "min 0 taken as 1, max below min as min"
    );
    let (_, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(usize::MAX, usize::MAX)
        .pair();
    handle.set_limit("c.test", usize::MAX);
    assert_eq!(
        handle.limit("c.test"),
        Some(1_000_000),
        "capped at 1,000,000"
    );
}

#[tokio::test(start_paused = true)]
async fn a_host_starts_at_twenty() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    layer
        .layer(slow_api(1, 200, Load::default()))
        .oneshot(get("a.test"))
        .await
        .unwrap();
    assert_eq!(handle.limit("a.test"), Some(20));
    // A 500 says nothing about capacity, so the limit stays where it started.
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_initial_limit(0).pair();
    layer
        .layer(slow_api(1, 500, Load::default()))
        .oneshot(get("a.test"))
        .await
        .unwrap();
    assert_eq!(
        handle.limit("a.test"),
        Some(1),
        "initial taken into the bounds"
    );
}

#[test]
fn backoff_ratio_is_validated_and_the_error_names_it() {
    for bad in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        let err = AdaptiveConcurrencyLayer::new()
            .with_backoff(bad)
            .unwrap_err();
        assert_eq!(*err.kind(), ErrorKind::Config, "{bad}");
        let text = err.to_string();
        assert!(
            text.contains("backoff") || text.contains("ratio"),
            "names the setting: {text}"
        );
    }
    assert!(AdaptiveConcurrencyLayer::new().with_backoff(0.5).is_ok());
}

#[tokio::test(start_paused = true)]
async fn doc_example_limits_one_one_zero_wait_refuses_the_second() {
    let client = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .layer(slow_api(10, 200, Load::default()));
    let first = tokio::spawn(client.clone().oneshot(get("api.example.com")));
    tokio::task::yield_now().await;
    let err = client
        .clone()
        .oneshot(get("api.example.com"))
        .await
        .unwrap_err();
    let reached = limit_reached(&err);
    assert_eq!((reached.key(), reached.limit()), ("api.example.com", 1));
    assert_eq!(reached.waited(), Duration::ZERO);
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    let core = sturdy::core::find::<sturdy::core::Error>(&*err).expect("a sturdy Error");
    assert_eq!(*core.kind(), ErrorKind::RateLimited { retry_after: None });
    let text = err.to_string();
    assert!(text.contains("api.example.com"), "names the host: {text}");
    first.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_full_limit_waits_up_to_max_wait_then_fails_not_sent() {
    let load = Load::default();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::from_millis(200))
        .pair();
    let client = layer.layer(slow_api(1_000, 200, load.clone()));
    let first = tokio::spawn(client.clone().oneshot(get("a.test")));
    tokio::task::yield_now().await;
    let start = Instant::now();
    let err = client.clone().oneshot(get("a.test")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    assert_eq!(limit_reached(&err).waited(), Duration::from_millis(200));
    assert_eq!(state(&handle, "a.test"), (1, 1, 0));
    first.await.unwrap().unwrap();
    assert_eq!(load.peak.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn default_max_wait_is_thirty_seconds() {
    let (layer, _) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let client = layer.layer(slow_api(100_000, 200, Load::default()));
    let _first = tokio::spawn(client.clone().oneshot(get("a.test")));
    tokio::task::yield_now().await;
    let start = Instant::now();
    let err = client.clone().oneshot(get("a.test")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(limit_reached(&err).waited(), Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn waiting_calls_go_first_come_first_served() {
    let (layer, _) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let client = layer.layer(slow_api(10, 200, Load::default()));
    let order = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let c = client.clone();
            let order = order.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(i)).await;
                c.oneshot(get("a.test")).await.unwrap();
                order.lock().unwrap().push(i);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..10).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn aborted_waiters_leave_the_line_and_hold_no_permit() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(2, 2).pair();
    let client = layer.layer(slow_api(1_000, 200, Load::default()));
    let holders: Vec<_> = (0..2)
        .map(|_| tokio::spawn(client.clone().oneshot(get("a.test"))))
        .collect();
    tokio::task::yield_now().await;
    let waiters: Vec<_> = (0..50)
        .map(|_| tokio::spawn(client.clone().oneshot(get("a.test"))))
        .collect();
    tokio::task::yield_now().await;
    assert_eq!(state(&handle, "a.test"), (2, 2, 50));
    for w in &waiters {
        w.abort();
    }
    for w in waiters {
        let _ = w.await;
    }
    assert_eq!(state(&handle, "a.test"), (2, 2, 0));
    for h in &holders {
        h.abort();
    }
    for h in holders {
        let _ = h.await;
    }
    assert_eq!(
        state(&handle, "a.test"),
        (2, 0, 0),
        "an aborted call in flight gives its permit back"
    );
    let start = Instant::now();
    client.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "no wait for a permit"
    );
}

#[tokio::test(start_paused = true)]
async fn ready_but_never_called_reserves_no_permit() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let client = layer.layer(slow_api(10, 200, Load::default()));
    let mut idle: Vec<_> = (0..5).map(|_| client.clone()).collect();
    for s in &mut idle {
        ServiceExt::<Request<()>>::ready(s).await.unwrap();
    }
    client.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(state(&handle, "a.test"), (1, 0, 0));
    drop(idle);
}

#[tokio::test(start_paused = true)]
async fn a_future_dropped_before_its_first_poll_gives_its_permit_back() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let client = layer.layer(slow_api(10, 200, Load::default()));
    for _ in 0..5 {
        let mut s = client.clone();
        ServiceExt::<Request<()>>::ready(&mut s).await.unwrap();
        drop(s.call(get("a.test")));
    }
    assert_eq!(state(&handle, "a.test").1, 0, "nothing in flight");
    client.clone().oneshot(get("a.test")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn in_flight_returns_to_zero_after_timeouts_above() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(3, 3).pair();
    let client = tower::ServiceBuilder::new()
        .timeout(Duration::from_millis(50))
        .layer(layer)
        .service(slow_api(1_000, 200, Load::default()));
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(client.clone().oneshot(get("a.test"))))
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().is_err());
    }
    let (_, in_flight, waiting) = state(&handle, "a.test");
    assert_eq!((in_flight, waiting), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn aimd_backs_off_once_per_round_trip_on_a_burst_of_503s() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let client = layer.layer(slow_api(10, 503, Load::default()));
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(client.clone().oneshot(get("a.test"))))
        .collect();
    for t in tasks {
        let _ = t.await.unwrap();
    }
    assert_eq!(
        handle.limit("a.test"),
        Some(18),
        "20 × 0.9 once, not twenty times"
    );
}

#[tokio::test(start_paused = true)]
async fn other_failures_say_nothing_about_capacity() {
    for status in [500u16, 404, 400] {
        let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
        let client = layer.layer(slow_api(10, status, Load::default()));
        let tasks: Vec<_> = (0..20)
            .map(|_| tokio::spawn(client.clone().oneshot(get("a.test"))))
            .collect();
        for t in tasks {
            let _ = t.await.unwrap();
        }
        assert_eq!(handle.limit("a.test"), Some(20), "{status} ignored");
    }
}

#[tokio::test(start_paused = true)]
async fn four_twenty_nine_and_504_are_overload_signals() {
    for status in [429u16, 504] {
        let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
        let client = layer.layer(slow_api(10, status, Load::default()));
        client.oneshot(get("a.test")).await.unwrap();
        assert_eq!(handle.limit("a.test"), Some(18), "{status}: 20 × 0.9");
    }
}

#[tokio::test(start_paused = true)]
async fn aimd_does_not_grow_while_unused() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let client = layer.layer(slow_api(10, 200, Load::default()));
    for _ in 0..200 {
        client.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert_eq!(
        handle.limit("a.test"),
        Some(20),
        "one at a time is far below half of 20"
    );
}

#[tokio::test(start_paused = true)]
async fn aimd_grows_under_load() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let client = layer.layer(slow_api(10, 200, Load::default()));
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    c.clone().oneshot(get("a.test")).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let limit = handle.limit("a.test").unwrap();
    assert!(limit > 20, "about one per round trip: {limit}");
}

#[tokio::test(start_paused = true)]
async fn doc_example_converges_to_the_servers_capacity() {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let api = service_fn(move |_req: Request<()>| {
        let in_flight = in_flight.clone();
        async move {
            let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            let status = if n > 10 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(()).unwrap())
        }
    });
    for algorithm in [Algorithm::Aimd, Algorithm::Vegas] {
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_algorithm(algorithm)
            .pair();
        let client = layer.layer(api.clone());
        let tasks: Vec<_> = (0..40)
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move {
                    for _ in 0..50 {
                        let _ = c.clone().oneshot(get("api.example.com")).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let limit = handle.limit("api.example.com").unwrap();
        assert!((8..=12).contains(&limit), "{algorithm:?}: {limit}");
        let (_, f, w) = state(&handle, "api.example.com");
        assert_eq!((f, w), (0, 0));
    }
}

#[tokio::test(start_paused = true)]
async fn set_limit_reports_an_event_and_states_are_sorted() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let (_, handle) = AdaptiveConcurrencyLayer::new()
        .on_event(move |e: &Event<'_>| {
            if let Event::ConcurrencyLimitChanged {
                key,
                host,
                from,
                to,
            } = *e
            {
                s.lock()
                    .unwrap()
                    .push((key.to_owned(), host.map(str::to_owned), from, to));
            }
        })
        .pair();
    handle.set_limit("b.test", 5);
    handle.set_limit("a.test:8443", 7);
    let keys: Vec<_> = handle.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["a.test:8443", "b.test"]);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("b.test".into(), Some("b.test".into()), 20, 5),
            ("a.test:8443".into(), Some("a.test:8443".into()), 20, 7),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn thousands_of_hosts_stay_bounded() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_max_hosts(16).pair();
    let client = layer.layer(slow_api(0, 200, Load::default()));
    for i in 0..3_000 {
        client
            .clone()
            .oneshot(get(&format!("h{i}.test")))
            .await
            .unwrap();
    }
    let n = handle.states().len();
    assert!(n <= 17, "at most 16 hosts and the overflow: {n}");
}

#[tokio::test(start_paused = true)]
async fn hosts_past_the_bound_with_calls_in_flight_share_one_overflow_limit() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_max_hosts(2)
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let client = layer.layer(slow_api(1_000, 200, Load::default()));
    let held: Vec<_> = ["a.test", "b.test", "c.test"]
        .iter()
        .map(|h| tokio::spawn(client.clone().oneshot(get(h))))
        .collect();
    tokio::task::yield_now().await;
    let err = client.clone().oneshot(get("d.test")).await.unwrap_err();
    assert_eq!(limit_reached(&err).limit(), 1);
    assert!(
        handle.state("zzz.test").is_some(),
        "answered with the overflow's state"
    );
    for h in held {
        h.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn under_buffer_and_concurrency_limit_1_a_kept_service_loops() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let inner = tower::ServiceBuilder::new()
        .concurrency_limit(1)
        .service(slow_api(5, 200, Load::default()));
    let svc = tower::buffer::Buffer::new(layer.layer(inner), 4);
    let mut kept = svc.clone();
    for _ in 0..10 {
        kept.ready()
            .await
            .unwrap()
            .call(get("a.test"))
            .await
            .unwrap();
    }
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let mut s = svc.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    s.ready().await.unwrap().call(get("a.test")).await.unwrap();
                }
            })
        })
        .collect();
    tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("no deadlock");
    assert_eq!(state(&handle, "a.test"), (1, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn under_a_timeout_layer_each_attempt_is_bounded() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let svc = tower::ServiceBuilder::new()
        .timeout(Duration::from_millis(100))
        .layer(layer)
        .service(slow_api(60, 200, Load::default()));
    // Two at once: the second waits 60 ms for the permit, then its 60 ms attempt ends past 100.
    let a = tokio::spawn(svc.clone().oneshot(get("a.test")));
    let b = tokio::spawn(svc.clone().oneshot(get("a.test")));
    assert!(a.await.unwrap().is_ok());
    assert!(b.await.unwrap().is_err());
    assert_eq!(state(&handle, "a.test").1, 0);
}

#[tokio::test(start_paused = true)]
async fn a_shared_limit_is_shared_by_clones_and_handles() {
    let layer = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO);
    let handle = layer.handle();
    let a = layer.clone().layer(slow_api(100, 200, Load::default()));
    let b = layer.layer(slow_api(100, 200, Load::default()));
    let first = tokio::spawn(a.oneshot(get("a.test")));
    tokio::task::yield_now().await;
    assert!(
        b.oneshot(get("a.test")).await.is_err(),
        "one limit across clones"
    );
    assert_eq!(state(&handle, "a.test").1, 1);
    first.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn rejection_event_names_key_and_limit() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let client = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .on_event(move |e: &Event<'_>| {
            if let Event::ConcurrencyRejected { key, host, limit } = *e {
                s.lock().unwrap().push(format!("{key} {host:?} {limit}"));
            }
        })
        .layer(slow_api(10, 200, Load::default()));
    let first = tokio::spawn(client.clone().oneshot(get("a.test")));
    tokio::task::yield_now().await;
    let _ = client.clone().oneshot(get("a.test")).await.unwrap_err();
    first.await.unwrap().unwrap();
    assert_eq!(*seen.lock().unwrap(), ["a.test Some(\"a.test\") 1"]);
}

#[tokio::test(start_paused = true)]
async fn custom_key_events_carry_no_host() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .on_event(move |e: &Event<'_>| {
            if let Event::ConcurrencyLimitChanged { key, host, .. } = *e {
                s.lock().unwrap().push((key.to_owned(), host.is_none()));
            }
        })
        .with_key(|_r: &Request<()>| "tenant-1".to_string())
        .pair();
    layer
        .layer(slow_api(10, 503, Load::default()))
        .oneshot(get("a.test"))
        .await
        .unwrap();
    assert_eq!(handle.limit("tenant-1"), Some(18));
    assert_eq!(*seen.lock().unwrap(), [("tenant-1".to_string(), true)]);
}

/// Four calls in flight under a limit of 4, then the limit is set to 2 by hand.
async fn four_in_flight_then_lowered_to_two() -> (
    ConcurrencyHandle,
    impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future = impl Send> + Clone,
    Vec<tokio::task::JoinHandle<Result<Response<()>, BoxError>>>,
) {
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(4)
        .with_max_wait(Duration::ZERO)
        .pair();
    let client = layer.layer(slow_api(100, 500, Load::default()));
    let held: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client.clone().oneshot(get("a.test"))))
        .collect();
    for _ in 0..100 {
        if handle.state("a.test").map_or(0, |s| s.in_flight()) == 4 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(state(&handle, "a.test"), (4, 4, 0));
    handle.set_limit("a.test", 2);
    (handle, client, held)
}

#[tokio::test(start_paused = true)]
async fn in_flight_after_a_lowered_limit_counts_the_calls_still_out() {
    let (handle, _client, held) = four_in_flight_then_lowered_to_two().await;
    let (limit, in_flight, _) = state(&handle, "a.test");
    assert_eq!(limit, 2);
    assert_eq!(in_flight, 4, "four calls are still in flight");
    for h in held {
        h.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_lowered_limit_retires_permits_as_calls_come_back() {
    let (handle, client, held) = four_in_flight_then_lowered_to_two().await;
    for h in held {
        h.await.unwrap().unwrap();
    }
    assert_eq!(state(&handle, "a.test"), (2, 0, 0));
    let now: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client.clone().oneshot(get("a.test"))))
        .collect();
    let mut refused = 0;
    for t in now {
        if t.await.unwrap().is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 1, "two places, not four");
}

#[tokio::test(start_paused = true)]
async fn a_limit_raised_again_before_calls_return_is_not_paid_twice() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(4)
        .with_max_wait(Duration::ZERO)
        .pair();
    let client = layer.layer(slow_api(100, 500, Load::default()));
    let held: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client.clone().oneshot(get("a.test"))))
        .collect();
    for _ in 0..100 {
        if handle.state("a.test").map_or(0, |s| s.in_flight()) == 4 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(state(&handle, "a.test").1, 4);
    handle.set_limit("a.test", 2);
    handle.set_limit("a.test", 4);
    for h in held {
        h.await.unwrap().unwrap();
    }
    let now: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client.clone().oneshot(get("a.test"))))
        .collect();
    for t in now {
        t.await.unwrap().expect("four places again");
    }
    let now: Vec<_> = (0..5)
        .map(|_| tokio::spawn(client.clone().oneshot(get("a.test"))))
        .collect();
    let mut refused = 0;
    for t in now {
        if t.await.unwrap().is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 1, "four places, not more");
}

#[tokio::test(start_paused = true)]
async fn in_flight_after_an_overload_backoff_counts_the_calls_still_out() {
    let n = Arc::new(AtomicUsize::new(0));
    let api = service_fn(move |_r: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            let (ms, status) = if i == 0 { (10, 503) } else { (100, 200) };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(()).unwrap())
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(10)
        .pair();
    let svc = layer.layer(api);
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a.test"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The 503 came back and lowered the limit to 9; nine calls are still out.
    assert_eq!(state(&handle, "a.test"), (9, 9, 0));
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}
