//! The retry layer's final error, sentence by sentence (docs/guides/retry.md "What the caller
//! gets", README): its message, kind, `CallReport`, delivery, and what it never says or leaks.
#![cfg(feature = "full")]

use std::time::Duration;

use sturdy::core::classify::delivery;
use sturdy::core::{find, BoxError, CallOptions, Delivery, ErrorKind, RateLimited};
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tower::{Layer, ServiceBuilder, ServiceExt};

use crate::retry28_common::*;

const URL: &str = "http://api.example.com/orders";

async fn call(layer: RetryLayer, api: Api, r: Req) -> Result<Res, BoxError> {
    layer.with_seed(11).layer(api).oneshot(r).await
}

#[tokio::test(start_paused = true)]
async fn gave_up_after_four_resets_names_the_cause() {
    let (svc, seen) = api(|_, _| Err(reset()));
    let err = call(RetryLayer::new(), svc, get(URL)).await.unwrap_err();
    assert_eq!(seen.len(), 4);
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection reset by peer"
    );
    let e = top(&err);
    assert_eq!(*e.kind(), ErrorKind::Transport);
    let report = e.report().unwrap();
    assert_eq!(report.attempts(), 4);
    assert_eq!(report.delivery(), Delivery::MaybeProcessed);
    assert_eq!(report.idempotency_key(), None);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    // "The last attempt's error is its source()".
    let src = std::error::Error::source(e).expect("a source");
    assert!(find::<std::io::Error>(src).is_some());
}

#[tokio::test(start_paused = true)]
async fn kind_is_the_last_attempts() {
    let (svc, _) = api(|n, _| if n < 3 { Ok(status(503)) } else { Err(reset()) });
    let err = call(RetryLayer::new(), svc, get(URL)).await.unwrap_err();
    assert_eq!(*top(&err).kind(), ErrorKind::Transport);
    assert_eq!(top(&err).report().unwrap().attempts(), 4);
}

#[tokio::test(start_paused = true)]
async fn refused_post_without_key_is_retried_and_said_safe_to_send_again() {
    let (svc, seen) = api(|_, _| Err(refused()));
    let err = call(RetryLayer::new(), svc, post(URL, "{}"))
        .await
        .unwrap_err();
    // "when the failure proves the request never left (a refused connection ...)"
    assert_eq!(seen.len(), 4);
    let text = err.to_string();
    assert!(text.contains("connection refused"), "{text}");
    assert!(
        text.ends_with("the request was not sent, so it is safe to send again"),
        "{text}"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(*top(&err).kind(), ErrorKind::Connect);
}

#[tokio::test(start_paused = true)]
async fn a_reset_post_without_key_is_sent_once_and_never_called_not_sent() {
    let (svc, seen) = api(|_, _| Err(reset()));
    let err = call(RetryLayer::new(), svc, post(URL, "{}"))
        .await
        .unwrap_err();
    assert_eq!(seen.len(), 1);
    let text = err.to_string();
    assert!(!text.contains("not sent"), "{text}");
    assert!(!text.contains("safe to send again"), "{text}");
    assert!(text.contains("connection reset by peer"), "{text}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

#[tokio::test(start_paused = true)]
async fn a_keyed_post_names_its_key_and_what_to_do() {
    let (svc, seen) = api(|_, _| Err(reset()));
    let client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new().with_seed(1))
        .service(svc);
    let err = client.oneshot(post(URL, "{}")).await.unwrap_err();
    assert_eq!(seen.len(), 4);
    let sent = seen.get(0).headers["idempotency-key"]
        .to_str()
        .unwrap()
        .to_owned();
    for i in 1..4 {
        assert_eq!(seen.get(i).headers["idempotency-key"], sent.as_str());
    }
    let text = err.to_string();
    assert!(
        text.ends_with(&format!(
            "; it may have been processed: retry with the same idempotency key {sent}"
        )),
        "{text}"
    );
    assert_eq!(top(&err).idempotency_key(), Some(sent.as_str()));
    assert_eq!(
        top(&err).report().unwrap().idempotency_key(),
        Some(sent.as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn a_503_then_refused_connections_is_not_called_unsent() {
    let (svc, seen) = api(|n, _| {
        if n == 0 {
            Ok(status(503))
        } else {
            Err(refused())
        }
    });
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "k-503-refused".parse().unwrap());
    let err = call(RetryLayer::new(), svc, r).await.unwrap_err();
    assert_eq!(seen.len(), 4);
    let text = err.to_string();
    assert!(!text.contains("not sent"), "{text}");
    assert!(
        text.contains("retry with the same idempotency key k-503-refused"),
        "{text}"
    );
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert_eq!(
        top(&err).report().unwrap().delivery(),
        Delivery::MaybeProcessed
    );
}

#[tokio::test(start_paused = true)]
async fn the_attempt_timeout_message_says_how_long() {
    let (svc, _) = api(|_, _| Ok(status(200)));
    let slow = tower::service_fn(move |r: Req| {
        let svc = svc.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            svc.oneshot(r).await
        }
    });
    let layer = RetryLayer::new()
        .with_seed(1)
        .with_attempt_timeout(Duration::from_secs(30));
    let err = layer.layer(slow).oneshot(get(URL)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: the attempt timed out after 30s"
    );
    assert_eq!(*top(&err).kind(), ErrorKind::Timeout);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

#[tokio::test(start_paused = true)]
async fn the_readme_example_message_for_two_minutes() {
    let (svc, _) = api(|_, _| Ok(with_retry_after(429, "120")));
    let err = call(RetryLayer::new(), svc, get("http://api.example.com/"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "rate limited by api.example.com; retry after 2m"
    );
    assert!(find::<RateLimited>(&*err).is_some());
}

#[tokio::test(start_paused = true)]
async fn messages_do_not_leak_userinfo_query_or_headers() {
    let url = "http://alice:hunter2@api.example.com:8443/orders?api_key=s3cr3t-q";
    let (svc, _) = api(|_, _| Err(reset()));
    let mut r = Request::post(url)
        .header("authorization", "Bearer tok-XYZZY")
        .header("idempotency-key", "k-leak")
        .body(http_body_util::Full::from("card=4242424242424242"))
        .unwrap();
    r.extensions_mut().insert(CallOptions::new());
    let err = call(RetryLayer::new(), svc.clone(), r).await.unwrap_err();
    let (svc429, _) = api(|_, _| Ok(with_retry_after(429, "3600")));
    let err2 = call(RetryLayer::new(), svc429, get(url)).await.unwrap_err();
    for e in [&err, &err2] {
        let all = format!("{e} | {e:?}");
        for secret in ["hunter2", "alice", "s3cr3t", "XYZZY", "4242"] {
            assert!(!all.contains(secret), "{secret} leaked: {all}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_final_503_without_retry_after_is_the_response() {
    let (svc, seen) = api(|_, _| Ok(status(503)));
    let res = call(RetryLayer::new(), svc, get(URL)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(seen.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn client_builder_final_error_reports_and_keeps_the_key() {
    let (svc, seen) = api(|_, _| Err(reset()));
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(2))
        .build(svc);
    let err = client.oneshot(post(URL, "{}")).await.unwrap_err();
    assert_eq!(seen.len(), 4);
    let key = seen.get(0).headers["idempotency-key"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        top(&err).report().unwrap().idempotency_key(),
        Some(key.as_str())
    );
    assert_eq!(top(&err).report().unwrap().attempts(), 4);
    assert!(err
        .to_string()
        .starts_with("gave up after 4 attempts: connection reset by peer"));
}

#[tokio::test(start_paused = true)]
async fn deadline_cutting_an_attempt_in_flight_is_maybe_processed() {
    let hang = tower::service_fn(|_r: Req| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<Res, BoxError>(status(200))
    });
    let start = tokio::time::Instant::now();
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "k-dl".parse().unwrap());
    let err = RetryLayer::new()
        .with_deadline(Duration::from_secs(2))
        .layer(hang)
        .oneshot(r)
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(*top(&err).kind(), ErrorKind::Timeout);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let text = err.to_string();
    assert!(!text.contains("not sent"), "{text}");
    assert!(text.contains("k-dl"), "{text}");
    assert_eq!(top(&err).report().unwrap().attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn no_backoff_sleep_is_started_past_the_deadline() {
    let (svc, seen) = api(|_, _| Ok(status(503)));
    let start = tokio::time::Instant::now();
    let res = call(
        RetryLayer::new().with_deadline(Duration::from_millis(200)),
        svc,
        get(URL),
    )
    .await;
    // The first sleep is at least 250 ms: it would end past the deadline, so it is not started.
    assert_eq!(seen.len(), 1);
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
    match res {
        Ok(r) => assert_eq!(r.status(), 503),
        Err(e) => panic!("a final response was expected, got {e}"),
    }
}

use http::Request;
