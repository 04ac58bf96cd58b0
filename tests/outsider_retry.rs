//! Outside tests of the retry layer, alone and with the idempotency-key layer, against the
//! claims of docs/guides/retry.md and the crate docs.
use crate::outsider_common;
use std::time::Duration;

use outsider_common::*;
use sturdy::core::classify::delivery;
use sturdy::core::{find, CallOptions, Delivery, ErrorKind, RateLimited};
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::retry::RetryLayer;
use tower::{Layer, ServiceBuilder, ServiceExt};

fn io_refused() -> Answer {
    Answer::Io(std::io::ErrorKind::ConnectionRefused)
}

#[tokio::test(start_paused = true)]
async fn default_is_four_attempts_and_last_503_is_returned() {
    let api = Api::new(vec![], status(503));
    let svc = RetryLayer::new().with_seed(1).layer(api.service());
    let res = svc.oneshot(get("http://api.example.com/x")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(api.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_never_shortened_and_at_most_plus_20_percent() {
    for seed in 0..20u64 {
        let api = Api::new(vec![status_h(503, &[("retry-after", "7")])], ok());
        let svc = RetryLayer::new().with_seed(seed).layer(api.service());
        let res = svc.oneshot(get("http://api.example.com/x")).await.unwrap();
        assert_eq!(res.status(), 200);
        let seen = api.seen();
        let gap = seen[1].at - seen[0].at;
        assert!(
            gap >= Duration::from_secs(7),
            "seed {seed}: slept {gap:?} < 7s"
        );
        assert!(
            gap <= Duration::from_millis(8_400),
            "seed {seed}: slept {gap:?} > 8.4s"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_longer_than_60s_fails_at_once_with_rate_limited() {
    let api = Api::new(vec![status_h(429, &[("retry-after", "61")])], ok());
    let svc = RetryLayer::new().layer(api.service());
    let start = tokio::time::Instant::now();
    let err = svc
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(api.calls(), 1);
    let rl = find::<RateLimited>(&*err).expect("RateLimited in the chain");
    assert_eq!(rl.retry_after(), Duration::from_secs(61));
    assert_eq!(
        err.to_string(),
        "rate limited by api.example.com; retry after 1m 1s"
    );
}

#[tokio::test(start_paused = true)]
async fn hostile_retry_after_values_do_not_panic_or_sleep_forever() {
    for v in [
        "99999999999999999999",
        "18446744073709551615",
        "9223372036854775807",
        "-1",
        "1.5",
        "  5  ",
        "abc",
        "",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "Thu, 01 Jan 1970 00:00:00 GMT",
        "Sun, 06 Nov 1994 08:49:47 GMT",
        "Mon, 32 Foo 2024 99:99:99 GMT",
    ] {
        let api = Api::new(vec![status_h(503, &[("retry-after", v)])], ok());
        let svc = RetryLayer::new().with_seed(3).layer(api.service());
        let fut = svc.oneshot(get("http://api.example.com/x"));
        let out = tokio::time::timeout(Duration::from_secs(120), fut).await;
        let out = out.unwrap_or_else(|_| panic!("Retry-After {v:?}: still waiting after 120 s"));
        match out {
            Ok(res) => assert_eq!(res.status(), 200, "{v:?}"),
            Err(e) => {
                let msg = e.to_string();
                // The message must not promise a wait of centuries.
                assert!(
                    find::<RateLimited>(&*e).is_some(),
                    "Retry-After {v:?}: unexpected error {msg}"
                );
                eprintln!("Retry-After {v:?} -> {msg}");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn post_without_key_is_not_retried_on_503_but_is_on_refused_connection() {
    let api = Api::new(vec![status(503)], ok());
    let svc = RetryLayer::new().layer(api.service());
    let res = svc
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(api.calls(), 1);

    let api = Api::new(vec![io_refused()], ok());
    let svc = RetryLayer::new().layer(api.service());
    let res = svc
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await;
    // An io ConnectionRefused after the service saw the request is indistinguishable from a
    // connect error to the classifier; both outcomes are acceptable, but no panic.
    let _ = res;
}

#[tokio::test(start_paused = true)]
async fn one_key_for_every_attempt_and_the_error_names_it() {
    let api = Api::new(vec![], Answer::Io(std::io::ErrorKind::ConnectionReset));
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new().with_seed(2))
        .service(api.service());
    let err = svc
        .oneshot(post("http://api.example.com/orders", "{\"a\":1}"))
        .await
        .unwrap_err();
    let seen = api.seen();
    assert_eq!(seen.len(), 4);
    let key = seen[0]
        .headers
        .get("idempotency-key")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(seen
        .iter()
        .all(|s| s.headers.get("idempotency-key").unwrap() == key.as_str()));
    assert!(seen.iter().all(|s| &s.body[..] == b"{\"a\":1}"));
    let e = find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.report().unwrap().attempts(), 4);
    assert_eq!(e.report().unwrap().idempotency_key(), Some(key.as_str()));
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let msg = err.to_string();
    assert!(msg.starts_with("gave up after 4 attempts: "), "{msg}");
    assert!(
        msg.contains(&format!("retry with the same idempotency key {key}")),
        "{msg}"
    );
}

#[tokio::test(start_paused = true)]
async fn call_options_key_wins_and_is_kept() {
    let api = Api::new(vec![status(503)], ok());
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new().with_seed(2))
        .service(api.service());
    let mut req = post("http://api.example.com/orders", "{}");
    req.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("order-42"));
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.headers.get("idempotency-key").unwrap(), "order-42");
    }
}

#[tokio::test(start_paused = true)]
async fn a_key_set_in_the_header_is_kept() {
    let api = Api::new(vec![status(503)], ok());
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new().with_seed(2))
        .service(api.service());
    let mut req = post("http://api.example.com/orders", "{}");
    req.headers_mut()
        .insert("idempotency-key", "mine-1".parse().unwrap());
    svc.oneshot(req).await.unwrap();
    for s in api.seen() {
        assert_eq!(s.headers.get_all("idempotency-key").iter().count(), 1);
        assert_eq!(s.headers.get("idempotency-key").unwrap(), "mine-1");
    }
}

#[tokio::test(start_paused = true)]
async fn in_flight_409_with_retry_after_and_key_is_retried_after_the_wait() {
    let api = Api::new(vec![status_h(409, &[("retry-after", "1")])], ok());
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new().with_seed(2))
        .service(api.service());
    let res = svc
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = api.seen();
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(1));

    // Without a key: a real conflict.
    let api = Api::new(vec![status_h(409, &[("retry-after", "1")])], ok());
    let svc = RetryLayer::new().layer(api.service());
    let res = svc
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    // Without Retry-After: a real conflict.
    let api = Api::new(vec![status(409)], ok());
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new())
        .service(api.service());
    let res = svc
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(api.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn per_request_options() {
    // without_retries
    let api = Api::new(vec![], status(503));
    let svc = RetryLayer::new().layer(api.service());
    let mut req = get("http://api.example.com/x");
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 503);
    assert_eq!(api.calls(), 1);
    // with_max_attempts(0) is taken as 1
    let mut req = get("http://api.example.com/x");
    req.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(0));
    assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 503);
    assert_eq!(api.calls(), 2);
    // with_max_attempts(7) more than the layer's
    let mut req = get("http://api.example.com/x");
    req.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(7));
    assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 503);
    assert_eq!(api.calls(), 9);
}

#[tokio::test(start_paused = true)]
async fn deadline_abandons_a_running_attempt() {
    let api = Api::new(vec![], Answer::Hang);
    let svc = RetryLayer::new()
        .with_deadline(Duration::from_secs(5))
        .layer(api.service());
    let start = tokio::time::Instant::now();
    let err = svc
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    let e = find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    eprintln!("deadline error: {err}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

#[tokio::test(start_paused = true)]
async fn per_request_deadline_overrides_layer() {
    let api = Api::new(vec![], Answer::Hang);
    let svc = RetryLayer::new()
        .with_deadline(Duration::from_secs(50))
        .layer(api.service());
    let mut req = get("http://api.example.com/x");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(2)));
    let start = tokio::time::Instant::now();
    let _ = svc.oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn no_sleep_past_the_deadline() {
    // 503 with Retry-After 10 and a deadline of 5 s: not slept, fails at once.
    let api = Api::new(vec![status_h(503, &[("retry-after", "10")])], ok());
    let svc = RetryLayer::new()
        .with_deadline(Duration::from_secs(5))
        .layer(api.service());
    let start = tokio::time::Instant::now();
    let out = svc.oneshot(get("http://api.example.com/x")).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    match out {
        Ok(res) => assert_eq!(res.status(), 503),
        Err(e) => assert!(find::<RateLimited>(&*e).is_some(), "{e}"),
    }
    assert_eq!(api.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn large_body_is_sent_once_and_not_retried() {
    let api = Api::new(vec![status(503)], ok());
    let svc = RetryLayer::new().with_body_limit(10).layer(api.service());
    let req = http::Request::put("http://api.example.com/x")
        .body(http_body_util::Full::from("01234567890123456789"))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(api.calls(), 1);
    assert_eq!(&api.seen()[0].body[..], b"01234567890123456789");
}

/// The first attempt reached the server (a 503), the second was refused at connect: the call
/// as a whole may have been processed, so "not sent" must not be claimed.
#[tokio::test(start_paused = true)]
async fn not_sent_is_only_claimed_when_no_attempt_reached_the_server() {
    let api = Api::new(
        vec![Answer::Io(std::io::ErrorKind::ConnectionReset)],
        io_refused(),
    );
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new().with_seed(1))
        .service(api.service());
    let err = svc
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap_err();
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert!(!err.to_string().contains("not sent"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_then_error_is_maybe_processed() {
    let api = Api::new(vec![Answer::Hang], status(500));
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(
            RetryLayer::new()
                .with_seed(1)
                .with_max_attempts(2)
                .with_attempt_timeout(Duration::from_secs(1)),
        )
        .service(api.service());
    let res = svc
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_call_while_it_sleeps_leaves_nothing_behind() {
    let api = Api::new(vec![status_h(503, &[("retry-after", "30")])], ok());
    let svc = RetryLayer::new().layer(api.service());
    let fut = svc.clone().oneshot(get("http://api.example.com/x"));
    let r = tokio::time::timeout(Duration::from_secs(5), fut).await;
    assert!(r.is_err());
    assert_eq!(api.calls(), 1);
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(
        api.calls(),
        1,
        "a dropped call must not retry in the background"
    );
    let res = svc.oneshot(get("http://api.example.com/x")).await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn budget_config_validation() {
    assert!(RetryLayer::new()
        .with_budget(Duration::from_millis(999), 10, 0.2)
        .is_err());
    assert!(RetryLayer::new()
        .with_budget(Duration::from_secs(61), 10, 0.2)
        .is_err());
    assert!(RetryLayer::new()
        .with_budget(Duration::from_secs(10), 10, -0.1)
        .is_err());
    assert!(RetryLayer::new()
        .with_budget(Duration::from_secs(10), 10, f32::NAN)
        .is_err());
    assert!(RetryLayer::new()
        .with_budget(Duration::from_secs(10), 10, 1000.0)
        .is_ok());
    let e = RetryLayer::new()
        .with_budget(Duration::ZERO, 10, 0.2)
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config);
}

#[tokio::test(start_paused = true)]
async fn zero_max_attempts_layer_is_one() {
    let api = Api::new(vec![], status(503));
    let svc = RetryLayer::new().with_max_attempts(0).layer(api.service());
    svc.oneshot(get("http://api.example.com/x")).await.unwrap();
    assert_eq!(api.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_on_429_with_no_attempt_left_is_not_slept() {
    let api = Api::new(vec![], status_h(429, &[("retry-after", "5")]));
    let svc = RetryLayer::new()
        .with_max_attempts(2)
        .with_seed(1)
        .layer(api.service());
    let start = tokio::time::Instant::now();
    let out = svc.oneshot(get("http://api.example.com/x")).await;
    // Attempt 1, sleep 5..6 s, attempt 2, then no attempt left: not slept again.
    assert_eq!(api.calls(), 2);
    assert!(
        start.elapsed() < Duration::from_secs(7),
        "{:?}",
        start.elapsed()
    );
    match out {
        Ok(res) => assert_eq!(res.status(), 429),
        Err(e) => assert!(find::<RateLimited>(&*e).is_some()),
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_exactly_60s_is_slept() {
    let api = Api::new(vec![status_h(503, &[("retry-after", "60")])], ok());
    let svc = RetryLayer::new().with_seed(1).layer(api.service());
    let res = svc.oneshot(get("http://api.example.com/x")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(api.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_after_http_date_uses_the_given_clock() {
    #[derive(Debug)]
    struct Fixed;
    impl sturdy::core::WallClock for Fixed {
        fn now(&self) -> std::time::SystemTime {
            std::time::UNIX_EPOCH + Duration::from_secs(784_111_777)
        }
    }
    let api = Api::new(
        vec![status_h(
            503,
            &[("retry-after", "Sun, 06 Nov 1994 08:49:47 GMT")],
        )],
        ok(),
    );
    let svc = RetryLayer::new()
        .with_clock(std::sync::Arc::new(Fixed))
        .with_seed(1)
        .layer(api.service());
    svc.oneshot(get("http://api.example.com/x")).await.unwrap();
    let seen = api.seen();
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_secs(10) && gap <= Duration::from_secs(12),
        "{gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn words_when_the_budget_or_the_deadline_stops_a_post() {
    let api = Api::new(vec![], Answer::Io(std::io::ErrorKind::ConnectionReset));
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(
            RetryLayer::new()
                .with_budget(Duration::from_secs(1), 0, 0.0)
                .unwrap(),
        )
        .service(api.service());
    let err = svc
        .clone()
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("budget: {msg}");
    assert!(!msg.contains("1 attempts"), "{msg}");
    assert!(msg.contains("idempotency key"), "{msg}");

    let api = Api::new(vec![], Answer::Hang);
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new().with_deadline(Duration::from_secs(2)))
        .service(api.service());
    let err = svc
        .clone()
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("deadline: {msg}");
    assert!(msg.contains("retry with the same idempotency key"), "{msg}");
}

/// A handler slower than the attempts: the server keeps answering 409 in flight with
/// Retry-After: 1. The caller must not be told it was "rate limited".
#[tokio::test(start_paused = true)]
async fn words_an_in_flight_409_that_outlasts_the_attempts() {
    let api = Api::new(vec![], status_h(409, &[("retry-after", "1")]));
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new().with_seed(1))
        .service(api.service());
    let out = svc
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await;
    assert_eq!(api.calls(), 4);
    match out {
        Ok(res) => assert_eq!(res.status(), 409),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("409 in flight exhausted: {msg}");
            assert!(
                !msg.contains("rate limited"),
                "a 409 in flight is reported as a rate limit: {msg}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn words_an_in_flight_409_with_a_long_retry_after() {
    let api = Api::new(vec![], status_h(409, &[("retry-after", "600")]));
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new().with_seed(1))
        .service(api.service());
    let out = svc
        .oneshot(post("http://api.example.com/orders", "{}"))
        .await;
    match out {
        Ok(res) => assert_eq!(res.status(), 409),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("409 in flight, Retry-After 600: {msg}");
            assert!(
                !msg.contains("rate limited"),
                "a 409 in flight is reported as a rate limit: {msg}"
            );
        }
    }
}
