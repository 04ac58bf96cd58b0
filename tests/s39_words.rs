//! s39: README's and ARCHITECTURE's sentences on the layer order and on what each layer sees,
//! and docs/guides/metrics.md's metrics, with every optional layer on at once (paused time,
//! in-process API; the harness is s39_stack's).

#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use sturdy::circuit::CircuitState;
use sturdy::core::{CallOptions, ErrorKind};
use sturdy::ratelimit::Quota;
use sturdy::version::VersionLayer;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::s39_stack::*;

type Row = (String, Vec<(String, String)>, DebugValue);

fn rows(s: &Snapshotter) -> Vec<Row> {
    s.snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _unit, _desc, v)| {
            let (_kind, key) = ck.into_parts();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, v)
        })
        .collect()
}

fn label<'a>(r: &'a Row, k: &str) -> Option<&'a str> {
    r.1.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

fn counter(rs: &[Row], name: &str, want: &[(&str, &str)]) -> u64 {
    rs.iter()
        .filter(|r| r.0 == name && want.iter().all(|(k, v)| label(r, k) == Some(*v)))
        .map(|r| match r.2 {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

fn histogram_len(rs: &[Row], name: &str, want: &[(&str, &str)]) -> usize {
    rs.iter()
        .filter(|r| r.0 == name && want.iter().all(|(k, v)| label(r, k) == Some(*v)))
        .map(|r| match &r.2 {
            DebugValue::Histogram(v) => v.len(),
            _ => 0,
        })
        .sum()
}

#[tokio::test(start_paused = true)]
async fn s39_metrics_of_the_full_stack_once_each_with_documented_labels() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    let slow = Arc::new(AtomicUsize::new(0));
    let s = slow.clone();
    let api = Api::new(move |n, req| {
        let p = req.uri().path();
        if p == "/flaky" && n == 0 {
            Step::Reply(1, resp(503, &[]))
        } else if p == "/limited" {
            Step::Reply(1, resp(429, &[("retry-after", "1")]))
        } else if p == "/slow" && s.fetch_add(1, Ordering::SeqCst) == 0 {
            ok_after(2_000)
        } else if p == "/same" {
            ok_after(50)
        } else {
            ok_after(10)
        }
    });
    let (client, h) = full(&api, Opts::default());
    // A 503 retried once (the first API request).
    assert_eq!(status(&client, get("/flaky")).await.unwrap(), 200);
    // Five identical GETs: four join.
    let mut futs = Vec::new();
    for _ in 0..5 {
        futs.push(status(&client, get("/same")));
    }
    for r in futures_util::future::join_all(futs).await {
        assert_eq!(r.unwrap(), 200);
    }
    // A hedge sent and won.
    warm(&client, 60).await;
    assert_eq!(status(&client, get("/slow")).await.unwrap(), 200);
    // A pause asked by a 429 with Retry-After (retried after it: the pause ends first).
    let _ = status(&client, get("/limited")).await;

    let rs = rows(&snap);
    let host = [("server.address", "api.test")];
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.retries",
            &[
                ("server.address", "api.test"),
                ("http.request.method", "GET"),
                ("error.type", "503")
            ]
        ),
        1,
        "{rs:#?}"
    );
    assert_eq!(
        histogram_len(
            &rs,
            "sturdy.retry.delay",
            &[
                ("server.address", "api.test"),
                ("sturdy.delay.source", "backoff")
            ]
        ),
        1
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.coalesce.coalesced",
            &[
                ("server.address", "api.test"),
                ("http.request.method", "GET")
            ]
        ),
        4
    );
    assert_eq!(h.coalesce.stats().joined(), 4);
    assert_eq!(counter(&rs, "sturdy.hedge.sent", &host), 1);
    assert_eq!(counter(&rs, "sturdy.hedge.won", &host), 1);
    assert_eq!(
        counter(&rs, "sturdy.auth.token.fetches", &host),
        1,
        "the token endpoint is api.test/oauth/token"
    );
    assert!(
        counter(
            &rs,
            "sturdy.ratelimit.pauses",
            &[
                ("server.address", "api.test"),
                ("sturdy.pause.source", "retry_after"),
                ("http.response.status_code", "429")
            ]
        ) >= 1,
        "{rs:#?}"
    );
    // No label is a path, query, key or port that the URI does not have.
    for r in &rs {
        assert!(label(r, "server.port").is_none(), "{r:?}");
        for (k, v) in &r.1 {
            assert!(!v.contains('/') && !v.contains('?'), "{k}={v} in {}", r.0);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn s39_deprecation_reported_once_across_retry_hedge_and_coalesce() {
    let notices = Arc::new(AtomicUsize::new(0));
    let n2 = notices.clone();
    let version = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .on_notice(move |_| {
            n2.fetch_add(1, Ordering::SeqCst);
        });
    let api = Api::new(|n, _| {
        let st = if n == 0 { 503 } else { 200 };
        Step::Reply(20, resp(st, &[("deprecation", "@1700000000")]))
    });
    let (client, _h) = full(
        &api,
        Opts {
            version: Some(version),
            ..Opts::default()
        },
    );
    let mut futs = Vec::new();
    for _ in 0..5 {
        futs.push(status(&client, get("/v")));
    }
    for r in futures_util::future::join_all(futs).await {
        assert_eq!(r.unwrap(), 200);
    }
    assert_eq!(status(&client, get("/v")).await.unwrap(), 200);
    assert_eq!(notices.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn s39_concurrency_place_is_not_held_during_retry_backoff() {
    let api = Api::new(|n, _| {
        if n == 0 {
            Step::Reply(1, resp(503, &[]))
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
    let t0 = Instant::now();
    let c = client.clone();
    let a = tokio::spawn(async move { status(&c, get("/a")).await });
    tokio::time::sleep(ms(20)).await; // A got its 503 and sleeps >= 100 ms
    assert_eq!(h.conc.state(HOST).map(|s| s.in_flight()), Some(0));
    assert_eq!(status(&client, get("/b")).await.unwrap(), 200);
    assert!(
        t0.elapsed() < ms(40),
        "B waited for A's backoff: {:?}",
        t0.elapsed()
    );
    assert_eq!(a.await.unwrap().unwrap(), 200);
}

#[tokio::test(start_paused = true)]
async fn s39_concurrency_place_is_not_held_while_waiting_for_a_rate_slot() {
    let api = Api::new(|_, _| ok_after(5));
    let (client, h) = full(
        &api,
        Opts {
            conc_limit: 1,
            quota: Some(Quota::per_second(1).unwrap()),
            ..Opts::default()
        },
    );
    h.conc.set_limit(HOST, 1);
    assert_eq!(status(&client, get("/a")).await.unwrap(), 200);
    let c = client.clone();
    let b = tokio::spawn(async move { status(&c, get("/b")).await });
    tokio::time::sleep(ms(300)).await;
    assert_eq!(h.rl.waiting(HOST), 1, "B is not waiting for a rate slot");
    let st = h.conc.state(HOST).unwrap();
    assert_eq!(
        st.in_flight(),
        0,
        "B holds a concurrency place while it waits: {st:?}"
    );
    assert_eq!(b.await.unwrap().unwrap(), 200);
}

#[tokio::test(start_paused = true)]
async fn s39_breaker_does_not_count_local_refusals() {
    let api = Api::new(|n, _| {
        if n == 0 {
            Step::Reply(1, resp(200, &[("ratelimit", r#""default";r=0;t=120"#)]))
        } else {
            ok_after(1)
        }
    });
    let (client, h) = full(
        &api,
        Opts {
            breaker_streak: 1,
            ..Opts::default()
        },
    );
    assert_eq!(status(&client, get("/a")).await.unwrap(), 200);
    for i in 0..5 {
        let err = status(&client, get(&format!("/r/{i}"))).await.unwrap_err();
        assert!(
            sturdy::core::find::<sturdy::core::RateLimited>(&*err).is_some(),
            "{err}"
        );
    }
    assert_eq!(h.cb.state(HOST), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn s39_attempt_timeout_of_a_request_is_per_attempt_and_counted_by_the_breaker() {
    let api = Api::new(|_, _| ok_after(1_000));
    let (client, h) = full(
        &api,
        Opts {
            breaker_streak: 3,
            attempts: 3,
            ..Opts::default()
        },
    );
    let mut req = get("/slow");
    req.extensions_mut()
        .insert(CallOptions::new().with_attempt_timeout(ms(50)));
    let t0 = Instant::now();
    let err = client.clone().oneshot(req).await.unwrap_err();
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a request with CallOptions is not coalesced: the retry's error is on top");
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{err}");
    assert_eq!(e.report().map(|r| r.attempts()), Some(3), "{err}");
    assert!(err.to_string().contains("50ms"), "{err}");
    // 3 attempts of 50 ms and two backoffs of at most 400 ms.
    assert!(t0.elapsed() < ms(1_000), "{:?}", t0.elapsed());
    assert!(
        matches!(h.cb.state(HOST), Some(CircuitState::Open { .. })),
        "{:?}",
        h.cb.state(HOST)
    );
}

#[tokio::test(start_paused = true)]
async fn s39_dropped_calls_under_buffer_and_limit_1_lose_no_permit() {
    let api = Api::new(|_, _| ok_after(100));
    let (client, h) = full(&api, Opts::default());
    let svc = ServiceBuilder::new()
        .buffer(8)
        .concurrency_limit(1)
        .service(client);
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let req = if i % 2 == 0 {
                post("/orders", "{}")
            } else {
                get(&format!("/d/{i}"))
            };
            let fut = match svc.ready().await {
                Ok(s) => s.call(req),
                Err(_) => return,
            };
            let _ = fut.await;
        }));
    }
    tokio::time::sleep(ms(150)).await;
    for t in &tasks {
        t.abort();
    }
    tokio::time::sleep(ms(10)).await;
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(get("/after")))
        .await
        .expect("a permit was lost: the next call hangs")
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(t0.elapsed() <= ms(110), "{:?}", t0.elapsed());
    let st = h.conc.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
    assert_eq!(h.rl.waiting(HOST), 0);
}

#[tokio::test(start_paused = true)]
async fn s39_deadline_passing_while_waiting_for_a_token_is_not_sent() {
    let api = Api::new(|_, _| ok_after(1));
    api.token_delay.store(1_000, Ordering::SeqCst);
    let (client, _h) = full(&api, Opts::default());
    let mut req = post("/orders", "{}");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(ms(200)));
    let t0 = Instant::now();
    let err = client.clone().oneshot(req).await.unwrap_err();
    assert!(t0.elapsed() <= ms(250), "{:?}", t0.elapsed());
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent,
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("access token"), "{msg}");
    assert!(msg.contains("200ms"), "{msg}");
    assert!(api.seen().is_empty());
}

#[tokio::test(start_paused = true)]
async fn s39_rate_slot_after_the_deadline_is_refused_at_once() {
    let api = Api::new(|_, _| ok_after(1));
    let (client, _h) = full(
        &api,
        Opts {
            quota: Some(Quota::per_second(1).unwrap()),
            ..Opts::default()
        },
    );
    assert_eq!(status(&client, get("/a")).await.unwrap(), 200);
    let mut req = post("/orders", "{}");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(ms(200)));
    let t0 = Instant::now();
    let err = client.clone().oneshot(req).await.unwrap_err();
    assert!(t0.elapsed() < ms(20), "waited {:?}", t0.elapsed());
    assert!(
        sturdy::core::find::<sturdy::core::RateLimited>(&*err).is_some(),
        "{err}"
    );
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent,
        "{err}"
    );
    assert!(err.to_string().contains("safe to send again"), "{err}");
    assert_eq!(api.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn s39_open_breaker_is_waited_out_within_a_deadline() {
    let api = Api::new(|n, _| {
        if n == 0 {
            Step::Reply(1, resp(503, &[]))
        } else {
            ok_after(1)
        }
    });
    let (client, h) = full(
        &api,
        Opts {
            breaker_streak: 1,
            attempts: 1,
            ..Opts::default()
        },
    );
    assert_eq!(status(&client, get("/a")).await.unwrap(), 503);
    assert!(matches!(h.cb.state(HOST), Some(CircuitState::Open { .. })));
    // Without a deadline: at once.
    let t0 = Instant::now();
    let err = status(&client, get("/b")).await.unwrap_err();
    assert!(t0.elapsed() < ms(10));
    assert!(sturdy::core::find::<sturdy::core::CircuitOpen>(&*err).is_some());
    // With a deadline past the open period (30 s): waited out, then sent.
    let mut req = get("/c");
    req.extensions_mut().insert(
        CallOptions::new()
            .with_deadline(Duration::from_secs(60))
            .with_max_attempts(3),
    );
    let t0 = Instant::now();
    let res = client.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        t0.elapsed() >= Duration::from_secs(25),
        "{:?}",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(40), "{:?}", t0.elapsed());
}

#[tokio::test(start_paused = true)]
async fn s39_post_refused_by_the_breaker_after_a_503_reports_the_503_and_the_refusal() {
    let api = Api::new(|_, _| Step::Reply(1, resp(503, &[])));
    let (client, _h) = full(
        &api,
        Opts {
            breaker_streak: 1,
            ..Opts::default()
        },
    );
    let err = status(&client, post("/orders", "{}")).await.unwrap_err();
    assert_eq!(api.count(), 1);
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a POST is not coalesced: the retry's error is on top");
    assert_eq!(
        e.kind(),
        &ErrorKind::Server(http::StatusCode::SERVICE_UNAVAILABLE),
        "{err}"
    );
    let report = e.report().expect("no CallReport");
    assert_eq!(report.attempts(), 1, "{err}");
    assert_eq!(report.delivery(), sturdy::core::Delivery::MaybeProcessed);
    assert!(
        sturdy::core::find::<sturdy::core::CircuitOpen>(&*err).is_some(),
        "{err}"
    );
    let key = report.idempotency_key().expect("no key").to_owned();
    assert_eq!(api.seen()[0].key.as_deref(), Some(key.as_str()));
    let msg = err.to_string();
    assert!(msg.contains("1 refused try"), "{msg}");
    assert!(msg.contains(&key), "{msg}");
}

#[tokio::test(start_paused = true)]
async fn s39_full_concurrency_limit_refusals_are_refused_tries_not_attempts() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let api = Api::new(|_, req| {
        if req.uri().path() == "/slow" {
            ok_after(10_000)
        } else {
            ok_after(1)
        }
    });
    let (client, h) = full(
        &api,
        Opts {
            conc_limit: 1,
            conc_max_wait: Some(Duration::ZERO),
            attempts: 3,
            ..Opts::default()
        },
    );
    h.conc.set_limit(HOST, 1);
    let c = client.clone();
    let slow = tokio::spawn(async move { status(&c, get("/slow")).await });
    tokio::time::sleep(ms(5)).await;
    let err = status(&client, post("/orders", "{}")).await.unwrap_err();
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a POST is not coalesced");
    let report = e.report().expect("no report");
    assert_eq!(report.attempts(), 0, "{err}");
    assert_eq!(report.delivery(), sturdy::core::Delivery::NotSent);
    assert!(
        sturdy::core::find::<sturdy::concurrency::LimitReached>(&*err).is_some(),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("concurrency limit"), "{msg}");
    assert!(msg.contains("safe to send again"), "{msg}");
    assert!(!api.seen().iter().any(|s| s.path == "/orders"));
    let ev = h.events.lock().unwrap().clone();
    assert_eq!(
        ev.iter()
            .filter(|e| e.starts_with("retry_scheduled") && e.ends_with("refused=true"))
            .count(),
        2,
        "{ev:?}"
    );
    let rs = rows(&snap);
    assert_eq!(
        counter(
            &rs,
            "sturdy.concurrency.rejections",
            &[("server.address", "api.test")]
        ),
        3,
        "{rs:#?}"
    );
    assert_eq!(
        counter(
            &rs,
            "sturdy.retry.retries",
            &[
                ("server.address", "api.test"),
                ("http.request.method", "POST"),
                ("error.type", "rate_limited")
            ]
        ),
        2,
        "{rs:#?}"
    );
    slow.abort();
}

#[tokio::test(start_paused = true)]
async fn s39_hostile_ratelimit_headers_never_panic_and_pauses_stay_capped() {
    let sets: &[&[(&str, &str)]] = &[
        &[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "99999999999"),
        ],
        &[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "-1")],
        &[
            ("x-ratelimit-remaining", "-3"),
            ("x-ratelimit-reset", "garbage"),
        ],
        &[("ratelimit", r#""x";r=0;t=-5"#)],
        &[("ratelimit", r#""x";r=0;t=18446744073709551616"#)],
        &[
            ("ratelimit", "r=0;t=10"),
            ("ratelimit-policy", "garbage;;;="),
        ],
        &[("ratelimit-remaining", "0"), ("ratelimit-reset", "1e400")],
        &[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")],
    ];
    for (i, headers) in sets.iter().enumerate() {
        let hs: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let api = Api::new(move |n, _| {
            if n == 0 {
                let h: Vec<(&str, &str)> =
                    hs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Step::Reply(1, resp(if i == 7 { 429 } else { 200 }, &h))
            } else {
                ok_after(1)
            }
        });
        let (client, h) = full(&api, Opts::default());
        let _ = status(&client, get("/first")).await;
        if let Some(p) = h.rl.pause(HOST) {
            assert!(p <= Duration::from_secs(300), "{headers:?}: pause {p:?}");
        }
        let t0 = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(400), status(&client, get("/next")))
            .await
            .unwrap_or_else(|_| panic!("{headers:?}: the next call hung"));
        match r {
            Ok(s) => assert_eq!(s, 200, "{headers:?}"),
            Err(e) => {
                let rl = sturdy::core::find::<sturdy::core::RateLimited>(&*e)
                    .unwrap_or_else(|| panic!("{headers:?}: {e}"));
                assert!(
                    rl.retry_after() <= Duration::from_secs(300),
                    "{headers:?}: {e}"
                );
                assert!(t0.elapsed() < ms(100), "{headers:?}: {:?}", t0.elapsed());
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn s39_hedge_of_a_half_open_probe_waits_for_the_probe() {
    let phase = Arc::new(AtomicUsize::new(0));
    let p = phase.clone();
    let api = Api::new(move |_, _| match p.load(Ordering::SeqCst) {
        0 => ok_after(10),
        1 => Step::Reply(1, resp(503, &[])),
        _ => ok_after(500),
    });
    let (client, h) = full(
        &api,
        Opts {
            breaker_streak: 1,
            attempts: 1,
            open_for: Some(ms(500)),
            ..Opts::default()
        },
    );
    warm(&client, 60).await;
    phase.store(1, Ordering::SeqCst);
    assert_eq!(status(&client, get("/fail")).await.unwrap(), 503);
    assert!(matches!(h.cb.state(HOST), Some(CircuitState::Open { .. })));
    tokio::time::sleep(ms(600)).await;
    phase.store(2, Ordering::SeqCst);
    let n = api.count();
    // The probe is slow: its hedge is due after ~11 ms but the half-open breaker has no slot.
    let r = status(&client, get("/probe")).await;
    assert_eq!(r.unwrap(), 200);
    assert_eq!(api.count() - n, 1);
    assert_eq!(h.cb.state(HOST), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn s39_deadline_abandons_both_hedged_copies() {
    let api = Api::new(|_, req| {
        if req.uri().path() == "/slow" {
            ok_after(5_000)
        } else {
            ok_after(10)
        }
    });
    let (client, h) = full(&api, Opts::default());
    warm(&client, 60).await;
    let mut req = get("/slow");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(ms(300)));
    let t0 = Instant::now();
    let err = client.clone().oneshot(req).await.unwrap_err();
    assert!(t0.elapsed() <= ms(310), "{:?}", t0.elapsed());
    assert_eq!(count(&h.events, "hedge_sent"), 1);
    tokio::time::sleep(ms(1)).await;
    assert_eq!(api.in_flight(), 0, "a copy outlived the deadline");
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a request with CallOptions is not coalesced");
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{err}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::MaybeProcessed
    );
    let st = h.conc.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn s39_a_failing_token_endpoint_is_not_the_apis_failure() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let api = Api::new(|_, _| ok_after(1));
    api.token_status.store(503, Ordering::SeqCst);
    let (client, h) = full(
        &api,
        Opts {
            breaker_streak: 1,
            attempts: 2,
            ..Opts::default()
        },
    );
    let err = status(&client, post("/orders", "{}")).await.unwrap_err();
    assert!(api.seen().is_empty());
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent,
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("/oauth/token"), "{msg}");
    assert!(msg.contains("safe to send again"), "{msg}");
    assert_eq!(
        h.cb.state(HOST).unwrap_or(CircuitState::Closed),
        CircuitState::Closed
    );
    let rs = rows(&snap);
    assert!(
        counter(
            &rs,
            "sturdy.auth.token.failures",
            &[("server.address", "api.test"), ("error.type", "503")]
        ) >= 1,
        "{rs:#?}"
    );
    assert_eq!(
        counter(&rs, "sturdy.circuit.transitions", &[]),
        0,
        "{rs:#?}"
    );
    // The endpoint is back: after its backoff, a call goes through and the breaker is closed.
    api.token_status.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(status(&client, get("/a")).await.unwrap(), 200);
    assert_eq!(h.cb.state(HOST), Some(CircuitState::Closed));
}

fn big(n: usize) -> Step {
    Step::Reply(
        50,
        http::Response::builder()
            .status(200)
            .body(http_body_util::Full::from(vec![b'x'; n]))
            .unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn s39_a_response_over_the_coalesce_bound_goes_to_its_caller_and_others_send_their_own() {
    use http_body_util::BodyExt;
    let api = Api::new(|_, _| big(2 << 20));
    let (client, h) = full(&api, Opts::default());
    let mut futs = Vec::new();
    for _ in 0..3 {
        let c = client.clone();
        futs.push(async move {
            let res = c.oneshot(get("/big")).await?;
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, sturdy::core::BoxError>(body.len())
        });
    }
    for r in futures_util::future::join_all(futs).await {
        assert_eq!(r.unwrap(), 2 << 20);
    }
    assert_eq!(api.count(), 3);
    assert!(h.coalesce.stats().too_large() >= 1);
}

#[tokio::test(start_paused = true)]
async fn s39_over_the_bound_with_the_leader_gone_a_follower_takes_its_response() {
    use http_body_util::BodyExt;
    let api = Api::new(|_, _| big(2 << 20));
    let (client, _h) = full(&api, Opts::default());
    warm(&client, 0).await;
    let c = client.clone();
    let leader = tokio::spawn(async move { c.oneshot(get("/big")).await.map(|_| ()) });
    tokio::time::sleep(ms(5)).await;
    let mut followers = Vec::new();
    for _ in 0..2 {
        let c = client.clone();
        followers.push(tokio::spawn(async move {
            let res = c.oneshot(get("/big")).await?;
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, sturdy::core::BoxError>(body.len())
        }));
    }
    tokio::time::sleep(ms(5)).await;
    leader.abort();
    for f in followers {
        let r = tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("a follower hung")
            .unwrap();
        assert_eq!(r.unwrap(), 2 << 20);
    }
    assert_eq!(
        api.count(),
        2,
        "one follower took the leader's response, one sent its own"
    );
}

#[tokio::test(start_paused = true)]
async fn s39_coalesce_keys_through_the_full_stack() {
    let api = Api::new(|_, _| ok_after(50));
    let (client, h) = full(&api, Opts::default());
    warm(&client, 0).await;
    // Requests with CallOptions go on their own.
    let mut futs = Vec::new();
    for _ in 0..3 {
        let mut req = get("/opts");
        req.extensions_mut()
            .insert(CallOptions::new().with_deadline(Duration::from_secs(5)));
        futs.push(client.clone().oneshot(req));
    }
    for r in futures_util::future::join_all(futs).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(api.count(), 3);
    // A different Accept is a different request; a different x-request-id is not.
    let mk = |accept: &str, rid: &str| {
        http::Request::get(url("/neg"))
            .header("accept", accept)
            .header("x-request-id", rid)
            .body(http_body_util::Full::default())
            .unwrap()
    };
    let futs = vec![
        client.clone().oneshot(mk("application/json", "1")),
        client.clone().oneshot(mk("application/json", "2")),
        client.clone().oneshot(mk("text/csv", "3")),
    ];
    for r in futures_util::future::join_all(futs).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(api.count(), 5);
    assert_eq!(h.coalesce.stats().joined(), 1);
    // Not a cache: the same GET after the first finished is sent again.
    assert_eq!(status(&client, get("/neg")).await.unwrap(), 200);
    assert_eq!(status(&client, get("/neg")).await.unwrap(), 200);
    assert_eq!(api.count(), 7);
}
