//! s36: the `metrics` feature and the `on_event` callbacks, checked against
//! docs/guides/metrics.md and the rustdoc of `sturdy::core::events`, with in-process services on
//! paused time and `metrics-util`'s debugging recorder.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::events::Event;
use sturdy::ratelimit::RateLimitLayer;
use sturdy::retry::{Backoff, RetryLayer};
use tower::{service_fn, Layer, Service, ServiceExt};

type Row = (String, Vec<(String, String)>, DebugValue);

fn rows(s: &Snapshotter) -> Vec<Row> {
    s.snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _unit, _desc, v)| {
            let (_kind, key) = ck.into_parts();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            (key.name().to_owned(), labels, v)
        })
        .collect()
}

fn named<'a>(rs: &'a [Row], name: &str) -> Vec<&'a Row> {
    rs.iter().filter(|r| r.0 == name).collect()
}

fn counter(rs: &[Row], name: &str, want: &[(&str, &str)]) -> u64 {
    rs.iter()
        .filter(|r| {
            r.0 == name
                && want
                    .iter()
                    .all(|(k, v)| r.1.iter().any(|(n, x)| n == k && x == v))
        })
        .map(|r| match r.2 {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

fn labels_of(r: &Row) -> Vec<(&str, &str)> {
    r.1.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn req(method: &str, uri: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::default())
        .unwrap()
}

fn resp(code: u16) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::default());
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

/// An API answering the statuses of `script` in turn (the last one afterwards), counting calls.
fn api(
    script: Vec<u16>,
) -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
        > + Clone
        + Send
        + 'static,
    Arc<AtomicU32>,
) {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let script = Arc::new(script);
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = c.fetch_add(1, Ordering::SeqCst) as usize;
        let code = *script.get(n).or(script.last()).unwrap();
        async move { Ok::<_, Infallible>(resp(code)) }
    });
    (svc, calls)
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::exponential(Duration::from_millis(100), Duration::from_millis(100)).unwrap(),
        )
        .with_seed(36)
}

/// metrics.md, Labels: "`server.address` and `server.port`: the host called, split from the
/// request's authority (...; no `server.port` when the URI has none)."
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_no_server_port_when_the_uri_has_none() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    for uri in [
        "http://api.example.com/orders",
        "https://api.example.com/orders",
    ] {
        let (svc, _) = api(vec![503, 200]);
        let res = quick_retry()
            .layer(svc)
            .oneshot(req("GET", uri))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let rs = rows(&snap);
    let retries = named(&rs, "sturdy.retry.retries");
    assert_eq!(retries.len(), 1, "{rs:?}");
    assert_eq!(
        labels_of(retries[0]),
        [
            ("error.type", "503"),
            ("http.request.method", "GET"),
            ("server.address", "api.example.com"),
        ],
        "{rs:?}"
    );
    assert_eq!(counter(&rs, "sturdy.retry.retries", &[]), 2);
}

/// events.rs, `split_authority`: "`[::1]:80` gives `("::1", Some("80"))`"; metrics.md: label
/// `server.address` is "the host called, split from the request's authority".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_ipv6_host_is_split_without_brackets() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let (svc, _) = api(vec![503, 200]);
    quick_retry()
        .layer(svc)
        .oneshot(req("GET", "http://[::1]:8080/x"))
        .await
        .unwrap();
    let rs = rows(&snap);
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.retries",
            &[("server.address", "::1"), ("server.port", "8080")]
        ),
        1,
        "{rs:?}"
    );
}

/// metrics.md, Labels: "`http.request.method`: the method, or `_OTHER` for a method outside the
/// nine standard ones." and "`not_idempotent` (a POST, PATCH or other method outside GET, HEAD,
/// PUT, DELETE, OPTIONS and TRACE, without an idempotency key, that may have reached the server)".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_custom_method_is_other_and_not_idempotent() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let (svc, calls) = api(vec![503, 200]);
    let res = quick_retry()
        .layer(svc)
        .oneshot(req("PURGE", "http://api.example.com/cache"))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let rs = rows(&snap);
    let stopped = named(&rs, "sturdy.retry.stopped");
    assert_eq!(stopped.len(), 1, "{rs:?}");
    assert_eq!(
        labels_of(stopped[0]),
        [
            ("error.type", "503"),
            ("http.request.method", "_OTHER"),
            ("server.address", "api.example.com"),
            ("sturdy.retry.stop_reason", "not_idempotent"),
        ]
    );
}

/// metrics.md, Labels: "`sturdy.retry.stop_reason`: `attempts_exhausted`, `budget_exhausted`,
/// ..." and the table: `sturdy.retry.stopped` counts "retryable failures that were not retried".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_a_spent_budget_is_budget_exhausted() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let (svc, calls) = api(vec![503]);
    let retry = quick_retry()
        .with_budget(Duration::from_secs(10), 0, 0.0)
        .unwrap();
    let res = retry
        .layer(svc)
        .oneshot(req("GET", "http://api.example.com/x"))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "no budget, no retry");
    let rs = rows(&snap);
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.stopped",
            &[
                ("sturdy.retry.stop_reason", "budget_exhausted"),
                ("error.type", "503")
            ]
        ),
        1,
        "{rs:?}"
    );
    assert_eq!(counter(&rs, "sturdy.retry.retries", &[]), 0);
}

/// metrics.md, table: `sturdy.retry.retries` counts "tries a layer below refused before they were
/// sent (`error.type` `rate_limited`, `circuit_open`, ...)", `sturdy.retry.delay` has
/// `sturdy.delay.source` `breaker`, and `sturdy.circuit.rejections` "each attempt counts".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_refused_tries_under_retry_are_circuit_open_with_breaker_delay() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let (svc, calls) = api(vec![503, 200]);
    let breaker = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1));
    let stack = quick_retry()
        .with_max_attempts(4)
        .with_deadline(Duration::from_secs(30))
        .layer(breaker.layer(svc));
    let res = stack
        .oneshot(req("GET", "http://api.example.com:8443/x"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let rs = rows(&snap);
    let host = [
        ("server.address", "api.example.com"),
        ("server.port", "8443"),
    ];
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.retries",
            &[host[0], host[1], ("error.type", "circuit_open")]
        ),
        counter(&rs, "sturdy.circuit.rejections", &host),
        "{rs:?}"
    );
    assert!(
        counter(&rs, "sturdy.circuit.rejections", &host) >= 1,
        "{rs:?}"
    );
    assert!(
        named(&rs, "sturdy.retry.delay")
            .iter()
            .any(|r| labels_of(r).contains(&("sturdy.delay.source", "breaker"))),
        "{rs:?}"
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.circuit.transitions",
            &[host[0], ("sturdy.circuit.state", "open")]
        ),
        1
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.circuit.transitions",
            &[host[0], ("sturdy.circuit.state", "closed")]
        ),
        1,
        "{rs:?}"
    );
}

/// metrics.md, table: `sturdy.circuit.transitions` labels "the state entered: `closed`, `open`,
/// `half_open`, `forced_open`"; `sturdy.circuit.open` is "1 while the breaker refuses calls
/// (open, forced open), 0 otherwise".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_forced_open_and_force_close_by_the_handle() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let (svc, _) = api(vec![200]);
    let mut svc = layer.layer(svc);
    svc.ready()
        .await
        .unwrap()
        .call(req("GET", "http://api.example.com/x"))
        .await
        .unwrap();
    handle.force_open("api.example.com");
    let gauge = |rs: &[Row]| {
        named(rs, "sturdy.circuit.open")
            .iter()
            .map(|r| match r.2 {
                DebugValue::Gauge(v) => v.into_inner(),
                _ => f64::NAN,
            })
            .collect::<Vec<_>>()
    };
    let rs = rows(&snap);
    assert_eq!(
        counter(
            &rs,
            "sturdy.circuit.transitions",
            &[
                ("server.address", "api.example.com"),
                ("sturdy.circuit.state", "forced_open")
            ]
        ),
        1,
        "{rs:?}"
    );
    let g = gauge(&rs);
    assert_eq!(g, [1.0], "{rs:?}");
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(req("GET", "http://api.example.com/x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("api.example.com"), "{err}");
    handle.force_close("api.example.com");
    let rs = rows(&snap);
    assert_eq!(
        counter(
            &rs,
            "sturdy.circuit.transitions",
            &[("sturdy.circuit.state", "closed")]
        ),
        1,
        "{rs:?}"
    );
    let g = gauge(&rs);
    assert_eq!(g, [0.0]);
    assert_eq!(counter(&rs, "sturdy.circuit.rejections", &[]), 1);
}

/// metrics.md: "Both see the same events; a layer with a callback still records metrics when
/// the feature is on." and "Setting it again replaces the callback."
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_second_on_event_replaces_the_first_and_the_recorder_still_counts() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let first = Arc::new(AtomicU32::new(0));
    let second = Arc::new(AtomicU32::new(0));
    let (f, s) = (first.clone(), second.clone());
    let retry = quick_retry()
        .on_event(move |_e: &Event<'_>| {
            f.fetch_add(1, Ordering::SeqCst);
        })
        .on_event(move |_e: &Event<'_>| {
            s.fetch_add(1, Ordering::SeqCst);
        });
    let (svc, _) = api(vec![503, 503, 503]);
    retry
        .layer(svc)
        .oneshot(req("GET", "http://api.example.com/x"))
        .await
        .unwrap();
    let rs = rows(&snap);
    let recorded =
        counter(&rs, "sturdy.retry.retries", &[]) + counter(&rs, "sturdy.retry.stopped", &[]);
    assert_eq!(first.load(Ordering::SeqCst), 0);
    assert_eq!(u64::from(second.load(Ordering::SeqCst)), recorded);
    // Four attempts (the default): three retries and one stop.
    assert_eq!(recorded, 4, "{rs:?}");
}

/// README: "the client (or any layer alone) can sit under a `Buffer` or over a
/// `ConcurrencyLimit`, driven by ... a kept `ready().await?.call(req)`"; metrics.md: each retry
/// is counted once ("failed tries that are retried").
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_under_buffer_and_concurrency_limit_counts_each_retry_once() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let (svc, calls) = api(vec![503, 200, 503, 200]);
    let stack = tower::ServiceBuilder::new()
        .buffer(8)
        .concurrency_limit(1)
        .layer(quick_retry())
        .service(svc);
    let mut a = stack.clone();
    let mut b = stack;
    let fa = async {
        a.ready()
            .await
            .unwrap()
            .call(req("GET", "http://api.example.com/a"))
            .await
            .unwrap()
    };
    let fb = async {
        b.ready()
            .await
            .unwrap()
            .call(req("GET", "http://api.example.com/b"))
            .await
            .unwrap()
    };
    let (ra, rb) = tokio::join!(fa, fb);
    assert_eq!((ra.status(), rb.status()), (StatusCode::OK, StatusCode::OK));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    let rs = rows(&snap);
    assert_eq!(counter(&rs, "sturdy.retry.retries", &[]), 2, "{rs:?}");
    assert_eq!(counter(&rs, "sturdy.retry.stopped", &[]), 0, "{rs:?}");
}

/// events.rs: `RetryScheduled` is "a try failed in a way worth trying again ...; the next try is
/// made after `delay`"; `RetryStopped`: "a try failed ..., but it was not retried". A caller
/// that drops the call during the backoff gets neither a second try nor a stop counted.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_a_call_dropped_during_backoff_counts_one_retry_and_no_stop() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let (svc, calls) = api(vec![503, 200]);
    let retry = RetryLayer::new()
        .with_backoff(Backoff::exponential(Duration::from_secs(5), Duration::from_secs(5)).unwrap())
        .with_seed(1);
    let fut = retry
        .layer(svc)
        .oneshot(req("GET", "http://api.example.com/x"));
    let out = tokio::time::timeout(Duration::from_millis(50), fut).await;
    assert!(out.is_err(), "the call ended before its backoff");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let rs = rows(&snap);
    assert_eq!(counter(&rs, "sturdy.retry.retries", &[]), 1, "{rs:?}");
    assert_eq!(counter(&rs, "sturdy.retry.stopped", &[]), 0, "{rs:?}");
}

/// metrics.md, "What it costs": "the adaptive concurrency limit [emits] one whenever a success
/// raises its whole number of calls"; events.rs: `ConcurrencyLimitChanged` is "the number of
/// calls a key may have in flight changed" (from the limit before to the limit now).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_concurrency_limit_events_are_real_changes_and_the_gauge_follows() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let layer = sturdy::concurrency::AdaptiveConcurrencyLayer::new().on_event(move |e| {
        if let Event::ConcurrencyLimitChanged { from, to, host, .. } = e {
            s.lock()
                .unwrap()
                .push((*from, *to, host.map(str::to_owned)));
        }
    });
    let svc = service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok::<_, Infallible>(resp(200))
    });
    let svc = layer.layer(svc);
    // Sixteen callers in parallel, twenty calls each: the limit has reasons to rise.
    let callers = (0..16).map(|_| {
        let mut svc = svc.clone();
        async move {
            for _ in 0..20 {
                svc.ready()
                    .await
                    .unwrap()
                    .call(req("GET", "http://api.example.com/x"))
                    .await
                    .unwrap();
            }
        }
    });
    futures_util::future::join_all(callers).await;
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "successes never raised the limit");
    for (from, to, host) in &seen {
        assert_ne!(from, to, "{seen:?}");
        assert!(to > from, "a success lowered the limit: {seen:?}");
        assert_eq!(host.as_deref(), Some("api.example.com"));
    }
    let last = seen.last().unwrap().1;
    let rs = rows(&snap);
    let g = named(&rs, "sturdy.concurrency.limit");
    assert_eq!(g.len(), 1, "{rs:?}");
    assert!(
        matches!(g[0].2, DebugValue::Gauge(v) if v.into_inner() == last as f64),
        "{g:?} vs {last}"
    );
}

/// metrics.md, table: `sturdy.ratelimit.pause.duration` is "the pause applied (after the
/// `max_pause` cap)", and `sturdy.ratelimit.pauses` counts "pauses a server asked for" with
/// `sturdy.pause.source` `retry_after`. Hostile values: the largest `Retry-After` with no cap
/// (`with_max_pause(Duration::MAX)`) must not panic.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_a_huge_retry_after_with_an_unbounded_cap_does_not_panic() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let svc = service_fn(|_req: Request<Full<Bytes>>| async {
        let mut r = resp(429);
        r.headers_mut()
            .insert("retry-after", "18446744073709551615".parse().unwrap());
        Ok::<_, Infallible>(r)
    });
    let layer = RateLimitLayer::adaptive_only()
        .with_max_pause(Duration::MAX)
        .with_max_wait(Duration::from_secs(1));
    let mut svc = layer.layer(svc);
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(req("GET", "http://api.example.com/x"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    // The next call is refused at once (it would wait past `max_wait`), without panicking.
    let err = tokio::time::timeout(Duration::from_secs(5), async {
        svc.ready()
            .await
            .unwrap()
            .call(req("GET", "http://api.example.com/x"))
            .await
    })
    .await
    .expect("the second call hung")
    .unwrap_err();
    assert!(err.to_string().contains("api.example.com"), "{err}");
    let rs = rows(&snap);
    assert_eq!(
        counter(
            &rs,
            "sturdy.ratelimit.pauses",
            &[
                ("sturdy.pause.source", "retry_after"),
                ("http.response.status_code", "429")
            ]
        ),
        1,
        "{rs:?}"
    );
    assert_eq!(counter(&rs, "sturdy.ratelimit.refusals", &[]), 1, "{rs:?}");
}

/// Hostile values: a breaker open for `Duration::MAX` under a retry layer with a deadline.
/// metrics.md: `sturdy.retry.stopped` counts "retryable failures that were not retried" with a
/// documented `sturdy.retry.stop_reason`; the call must end, not panic or sleep forever.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_a_breaker_open_for_duration_max_ends_the_call_and_counts_a_stop() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let (svc, calls) = api(vec![503]);
    let breaker = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::MAX, Duration::MAX);
    let stack = quick_retry()
        .with_max_attempts(5)
        .with_deadline(Duration::from_secs(10))
        .layer(breaker.layer(svc));
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        stack.oneshot(req("GET", "http://api.example.com/x")),
    )
    .await
    .expect("the call outlived its deadline");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    match out {
        Ok(res) => assert_eq!(res.status(), 503),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let rs = rows(&snap);
    let stopped = named(&rs, "sturdy.retry.stopped");
    assert_eq!(counter(&rs, "sturdy.retry.stopped", &[]), 1, "{rs:?}");
    let reason = labels_of(stopped[0])
        .into_iter()
        .find(|(k, _)| *k == "sturdy.retry.stop_reason")
        .unwrap()
        .1;
    assert!(
        [
            "attempts_exhausted",
            "budget_exhausted",
            "not_idempotent",
            "wait_too_long",
            "past_deadline",
            "not_replayable"
        ]
        .contains(&reason),
        "{reason}"
    );
}

/// metrics.md, table: `sturdy.auth.token.rejections` counts "401s to a cached token, each
/// followed by a refresh and one replay" labelled with "`server.address`, `server.port` (the
/// API)"; `sturdy.auth.token.fetches` counts "tokens fetched" labelled with the token endpoint.
/// An API that answers 401 every time: one rejection, two fetches, two sends, no loop.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_a_401_to_a_cached_token_counts_one_rejection_and_one_refresh() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let fetched = Arc::new(AtomicU32::new(0));
    let f = fetched.clone();
    let token_endpoint = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = f.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut r = Response::new(Full::new(Bytes::from(format!(
                r#"{{"access_token":"tok{n}","token_type":"Bearer","expires_in":3600}}"#
            ))));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, Infallible>(r)
        }
    });
    let tokens = sturdy::auth::ClientCredentials::new(
        token_endpoint,
        "https://auth.example.com:8443/oauth/token",
        "id",
        "s3cret",
    )
    .unwrap();
    let (api, sends) = api(vec![401]);
    let svc = sturdy::auth::AuthLayer::oauth2(tokens).layer(api);
    let res = svc
        .oneshot(req("GET", "https://api.example.com/orders"))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(sends.load(Ordering::SeqCst), 2, "one send and one replay");
    assert_eq!(fetched.load(Ordering::SeqCst), 2);
    let rs = rows(&snap);
    let rej = named(&rs, "sturdy.auth.token.rejections");
    assert_eq!(rej.len(), 1, "{rs:?}");
    assert_eq!(labels_of(rej[0]), [("server.address", "api.example.com")]);
    assert_eq!(counter(&rs, "sturdy.auth.token.rejections", &[]), 1);
    assert_eq!(
        counter(
            &rs,
            "sturdy.auth.token.fetches",
            &[
                ("server.address", "auth.example.com"),
                ("server.port", "8443")
            ]
        ),
        2,
        "{rs:?}"
    );
}

/// metrics.md, table: `sturdy.retry.delay` is "the wait before each retry" with
/// `sturdy.delay.source` `retry_after` when the server's `Retry-After` set it; `Retry-After: 0`
/// asks for no wait at all.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_retry_after_zero_is_a_zero_delay_from_retry_after() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut r = resp(if n == 0 { 503 } else { 200 });
            r.headers_mut().insert("retry-after", "0".parse().unwrap());
            Ok::<_, Infallible>(r)
        }
    });
    let start = tokio::time::Instant::now();
    let res = RetryLayer::new()
        .with_retry_after_jitter(0.0)
        .layer(svc)
        .oneshot(req("GET", "http://api.example.com/x"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let rs = rows(&snap);
    let d = named(&rs, "sturdy.retry.delay");
    assert_eq!(d.len(), 1, "{rs:?}");
    assert!(
        labels_of(d[0]).contains(&("sturdy.delay.source", "retry_after")),
        "{rs:?}"
    );
    let DebugValue::Histogram(ref v) = d[0].2 else {
        panic!("{rs:?}")
    };
    let waited = start.elapsed().as_secs_f64();
    assert_eq!(v.len(), 1);
    assert!(
        (v[0].into_inner() - waited).abs() < 0.001,
        "{v:?} vs {waited}"
    );
}

/// A shared store for the rate limit that grants every call a slot after `wait`, or denies.
#[derive(Debug)]
struct Store {
    wait: Option<Duration>,
}

impl sturdy::ratelimit::RemoteQuota for Store {
    fn reserve(
        &self,
        _key: &str,
        _max_wait: Duration,
    ) -> sturdy::ratelimit::BoxFuture<Result<sturdy::ratelimit::Reserve, sturdy::core::BoxError>>
    {
        let r = match self.wait {
            Some(wait) => sturdy::ratelimit::Reserve::Granted { wait },
            None => sturdy::ratelimit::Reserve::Denied {
                retry_after: Duration::from_secs(30),
            },
        };
        Box::pin(std::future::ready(Ok(r)))
    }
}

/// metrics.md, table: `sturdy.ratelimit.waits` counts "calls that waited in line for a slot or
/// for a pause to end (a wait a shared Redis quota grants is not counted)"; events.rs,
/// `RateLimitRefused`: "a call was refused without being sent, because it would have waited
/// longer than allowed (or the shared store said no)".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_a_shared_store_grant_is_not_a_wait_and_its_no_is_a_refusal() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let quota = sturdy::ratelimit::Quota::per_second(10).unwrap();
    let (svc, calls) = api(vec![200]);
    let granted = RateLimitLayer::new(quota)
        .with_remote(Arc::new(Store {
            wait: Some(Duration::from_millis(500)),
        }))
        .layer(svc.clone());
    let start = tokio::time::Instant::now();
    granted
        .oneshot(req("GET", "http://api.example.com/x"))
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(500));
    let rs = rows(&snap);
    assert_eq!(counter(&rs, "sturdy.ratelimit.waits", &[]), 0, "{rs:?}");
    let denied = RateLimitLayer::new(quota)
        .with_remote(Arc::new(Store { wait: None }))
        .layer(svc);
    let err = denied
        .oneshot(req("GET", "http://api.example.com/x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("api.example.com"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let rs = rows(&snap);
    assert_eq!(
        counter(
            &rs,
            "sturdy.ratelimit.refusals",
            &[("server.address", "api.example.com")]
        ),
        1,
        "{rs:?}"
    );
}

/// metrics.md, table: `sturdy.retry.retries` counts "tries a layer below refused before they
/// were sent (`error.type` `rate_limited`, ...)", and `sturdy.retry.delay`'s
/// `sturdy.delay.source` is `rate_limit` for a wait a rate limiter named; the limiter counts
/// the refusal (`sturdy.ratelimit.refusals`) and no wait.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_a_local_limiter_refusal_under_retry_is_rate_limited_with_its_wait() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let (svc, calls) = api(vec![200]);
    let limiter = RateLimitLayer::new(sturdy::ratelimit::Quota::per_second(1).unwrap())
        .with_max_wait(Duration::ZERO);
    let mut stack = quick_retry()
        .with_deadline(Duration::from_secs(30))
        .layer(limiter.layer(svc));
    for _ in 0..2 {
        let res = stack
            .ready()
            .await
            .unwrap()
            .call(req("GET", "http://api.example.com:8080/x"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let rs = rows(&snap);
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.retries",
            &[("error.type", "rate_limited"), ("server.port", "8080")]
        ),
        1,
        "{rs:?}"
    );
    let d = named(&rs, "sturdy.retry.delay");
    assert_eq!(d.len(), 1, "{rs:?}");
    assert!(labels_of(d[0]).contains(&("sturdy.delay.source", "rate_limit")));
    let DebugValue::Histogram(ref v) = d[0].2 else {
        panic!("{rs:?}")
    };
    assert!(
        (0.5..=1.5).contains(&v[0].into_inner()),
        "a 1/s quota names a wait of about 1 s: {v:?}"
    );
    assert_eq!(counter(&rs, "sturdy.ratelimit.refusals", &[]), 1, "{rs:?}");
    assert_eq!(counter(&rs, "sturdy.ratelimit.waits", &[]), 0, "{rs:?}");
}

type BoxErr = sturdy::core::BoxError;

/// An API whose every call fails to connect.
fn refusing() -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = BoxErr,
            Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, BoxErr>> + Send,
        > + Clone
        + Send
        + 'static,
    Arc<AtomicU32>,
) {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            Err::<Response<Full<Bytes>>, BoxErr>(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )))
        }
    });
    (svc, calls)
}

/// events.rs, `RetryScheduled::attempt`: "A try that a layer below refused before it was sent
/// (an open breaker, ...) counts here, as it counts against `max_attempts`, and has `refused`
/// set: it is not an attempt (`CallReport::attempts` and the error's message leave it out)."
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_refused_tries_are_numbered_flagged_and_left_out_of_the_message() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let (svc, calls) = refusing();
    let breaker = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1));
    let retry = quick_retry()
        .with_max_attempts(3)
        .with_deadline(Duration::from_secs(30))
        .on_event(move |e: &Event<'_>| match e {
            Event::RetryScheduled {
                attempt, refused, ..
            } => s.lock().unwrap().push(("scheduled", *attempt, *refused)),
            Event::RetryStopped {
                attempt, refused, ..
            } => s.lock().unwrap().push(("stopped", *attempt, *refused)),
            _ => {}
        });
    let err = retry
        .layer(breaker.layer(svc))
        .oneshot(req("GET", "http://api.example.com/x"))
        .await
        .unwrap_err();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "{seen:?}");
    assert_eq!(
        seen,
        [
            ("scheduled", 1, false),
            ("scheduled", 2, true),
            ("stopped", 3, false)
        ]
    );
    let text = err.to_string();
    assert!(text.starts_with("gave up after 2 attempts"), "{text}");
    let report = sturdy::core::find::<sturdy::core::Error>(&*err)
        .and_then(|e| e.report().map(|r| r.attempts()));
    assert_eq!(report, Some(2), "{text}");
}

/// Hostile state: a breaker forced open by hand has no end. metrics.md, table:
/// `sturdy.circuit.rejections` counts "requests the breaker refused at once (`CircuitOpen`)";
/// `sturdy.retry.stopped` counts "retryable failures that were not retried". A call under a
/// retry layer with a deadline ends, refused, without being sent, and without waiting for ever.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_a_forced_open_breaker_under_retry_ends_the_call_and_counts_it() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    handle.force_open("api.example.com");
    let (svc, calls) = api(vec![200]);
    let stack = quick_retry()
        .with_deadline(Duration::from_secs(10))
        .layer(layer.layer(svc));
    let start = tokio::time::Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(3600),
        stack.oneshot(req("GET", "http://api.example.com/x")),
    )
    .await
    .expect("a call under a forced-open breaker never ended");
    let err = out.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(
        start.elapsed() <= Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(delivery_of(&err), sturdy::core::Delivery::NotSent, "{err}");
    let rs = rows(&snap);
    assert!(
        counter(&rs, "sturdy.circuit.rejections", &[]) >= 1,
        "{rs:?}"
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.stopped",
            &[("error.type", "circuit_open")]
        ),
        1,
        "{rs:?}"
    );
}

fn delivery_of(err: &BoxErr) -> sturdy::core::Delivery {
    sturdy::core::classify::delivery(&**err)
}

/// metrics.md, "Cardinality stays bounded: label values are hosts (as many as the hosts your
/// client calls)"; Labels: "`server.address` ...: the host called". Host names are
/// case-insensitive (RFC 3986 §3.2.2): one host called with two spellings is one host.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_one_host_in_two_cases_is_one_label_value() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    for uri in ["http://api.example.com/x", "http://API.Example.COM/x"] {
        let (svc, _) = api(vec![503, 200]);
        quick_retry()
            .layer(svc)
            .oneshot(req("GET", uri))
            .await
            .unwrap();
    }
    let rs = rows(&snap);
    let addresses: Vec<_> = named(&rs, "sturdy.retry.retries")
        .iter()
        .flat_map(|r| labels_of(r))
        .filter(|(k, _)| *k == "server.address")
        .map(|(_, v)| v.to_owned())
        .collect();
    assert_eq!(addresses, ["api.example.com"], "{rs:?}");
}

/// metrics.md, Labels: "`server.address` and `server.port`: the host called, split from the
/// request's authority"; events.rs, `RetryScheduled::host`: "The host called (authority, without
/// user info)". A request in origin form (`/x`, the host in a `Host` header, as a proxy or a
/// server-side client stack may send) still names its host, never an empty label value.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s36_metrics_origin_form_request_has_no_empty_server_address() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let (svc, _) = api(vec![503, 200]);
    let r = Request::get("/x")
        .header("host", "api.example.com")
        .body(Full::default())
        .unwrap();
    quick_retry().layer(svc).oneshot(r).await.unwrap();
    let rs = rows(&snap);
    for r in &rs {
        for (k, v) in &r.1 {
            assert!(!v.is_empty(), "{} has an empty {k}: {rs:?}", r.0);
        }
    }
    assert_eq!(counter(&rs, "sturdy.retry.retries", &[]), 1, "{rs:?}");
}
