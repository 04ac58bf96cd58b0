//! Interop: what an agent is told (`ErrorSummary`, `tool_result`) about failures from the real
//! peers: nginx's `Retry-After`, HAProxy's 504 with an opening breaker, a local refusal.
use crate::interop_common;
use std::time::Duration;

use futures_util::future::join_all;
use interop_common::*;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::summary::tool_result;
use sturdy::core::{CallOptions, ErrorSummary};
use sturdy::ratelimit::RateLimitLayer;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tower::ServiceExt;

const NGINX: &str = "STURDY_INTEROP_NGINX_URL";
const GATEWAY_TIMEOUT: &str = "STURDY_INTEROP_HAPROXY_GATEWAY_TIMEOUT_URL";

fn fast_retry() -> RetryLayer {
    RetryLayer::new().with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(5), Duration::from_millis(20)).unwrap(),
    )
}

/// nginx's 429 with `Retry-After: 1` on the last attempt: the call ends as `RateLimited` (docs/
/// guides/retry.md: "also on the last attempt, so the caller always learns how long the server
/// asked it to wait"); the summary says rate_limited, retryable, about 1000 ms, one attempt,
/// and the tool result's text is the message then the advice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_retry_after_on_the_last_attempt_for_an_agent() {
    let base = peer_or_skip!(NGINX);
    let client = ClientBuilder::new().with_retry(fast_retry()).build(http());
    let url = format!(
        "{base}/retry-after/i24-summary-{}-{}",
        std::process::id(),
        line!()
    );
    // Use up nginx's burst of 5 (plus one) with plain requests.
    join_all((0..8).map(|_| http().request(get(&url)))).await;
    let mut req = get(&url);
    req.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(1));
    let err = client.clone().oneshot(req).await.unwrap_err();
    let s = ErrorSummary::of(&*err);
    eprintln!("{s:?}");
    assert_eq!(s.kind, "rate_limited", "{s:?}");
    assert!(s.retryable, "{s:?}");
    let ms = s.retry_after_ms.expect("the server said when");
    assert!((900..=1000).contains(&ms), "{s:?}");
    assert_eq!(s.attempts, Some(1), "{s:?}");
    let v = tool_result::<()>(Err(err));
    assert_eq!(v["isError"], true);
    let text = v["content"][0]["text"].as_str().unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(s.message.as_str()), "{text}");
    assert_eq!(lines.next(), Some(s.advice().as_str()), "{text}");
    assert_eq!(v["structuredContent"]["error"]["kind"], "rate_limited");
}

/// A keyed POST answered 504 three times by HAProxy, whose fourth try the opened breaker
/// refused: the summary keeps the 504's kind and status, three attempts, the key, "may have
/// been processed", and the breaker's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_timeouts_then_an_open_breaker_for_an_agent() {
    let base = peer_or_skip!(GATEWAY_TIMEOUT);
    let client = ClientBuilder::new()
        .with_retry(fast_retry())
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(3))
        .build(http());
    let err = client
        .clone()
        .oneshot(post(&format!("{base}/i24-summary-504"), "{}"))
        .await
        .unwrap_err();
    let s = ErrorSummary::of(&*err);
    eprintln!("{s:?}\n{}", s.advice());
    assert_eq!(s.kind, "server_error", "{s:?}");
    assert_eq!(s.status, Some(504), "{s:?}");
    assert_eq!(s.attempts, Some(3), "{s:?}");
    assert!(s.may_have_been_processed, "{s:?}");
    assert!(s.idempotency_key.is_some(), "{s:?}");
    let ms = s.retry_after_ms.expect("the breaker said when");
    assert!((25_000..=30_000).contains(&ms), "{s:?}");
    let advice = s.advice();
    assert!(
        advice.contains(s.idempotency_key.as_deref().unwrap())
            || advice.contains("same idempotency key")
            || advice.contains("check"),
        "{advice}"
    );
}

/// A local refusal (zero `max_wait` during a pause nginx asked for), a POST: nothing reached
/// the server, so `may_have_been_processed` is false and the advice says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_refusal_for_an_agent() {
    let base = peer_or_skip!(NGINX);
    let client = ClientBuilder::new()
        .with_retry(fast_retry().with_max_retry_after(Duration::from_millis(100)))
        .with_rate_limit(RateLimitLayer::adaptive_only().with_max_wait(Duration::ZERO))
        .build(http());
    let url = format!(
        "{base}/retry-after/i24-summary-{}-{}",
        std::process::id(),
        line!()
    );
    join_all((0..8).map(|_| client.clone().oneshot(get(&url)))).await;
    let err = client.clone().oneshot(post(&url, "{}")).await.unwrap_err();
    let s = ErrorSummary::of(&*err);
    eprintln!("{s:?}\n{}", s.advice());
    assert_eq!(s.kind, "rate_limited", "{s:?}");
    assert!(!s.may_have_been_processed, "{s:?}");
    assert_eq!(s.attempts, Some(0), "{s:?}");
    assert!(s.retry_after_ms.is_some(), "{s:?}");
    assert!(s.advice().contains("not processed"), "{}", s.advice());
}
