//! Last hostile peers: an API that answers 401 to every token, 429 `Retry-After: 0` forever, a
//! TLS handshake abandoned by a dropped call, and the summary of a body cut short.

use std::time::Duration;

use http_body_util::BodyExt;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::core::classify::delivery;
use sturdy::core::summary::ErrorSummary;
use sturdy::core::{Delivery, RateLimited};
use sturdy::ClientBuilder;
use tower::ServiceExt;

use crate::wire28_util::*;

const MS: fn(u64) -> Duration = Duration::from_millis;

#[tokio::test]
async fn wire28_an_api_that_refuses_every_token_costs_no_refresh_per_call() {
    let token = answering(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 43\r\n\r\n{\"access_token\":\"tok-28\",\"expires_in\":3600}",
    )
    .await;
    let api = answering(
        b"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer error=\"invalid_token\"\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let tokens =
        ClientCredentials::new(hyper_client(), &token.url("/token"), "c", "s-SECRET").unwrap();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_auth(AuthLayer::oauth2(tokens))
        .with_attempt_timeout(MS(500))
        .build(hyper_client());
    for _ in 0..3 {
        let res = within(5, client.clone().oneshot(post(&api.url("/orders"))))
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
    }
    // The first 401 fetches a new token and replays; that token refused too, before the API
    // accepted anything, is kept for a second (doubling) and the next calls' 401s come back
    // without a replay or a token request.
    assert_eq!(api.seen.requests(), 4, "one replay, on the first call only");
    assert_eq!(token.seen.requests(), 2);
}

#[tokio::test]
async fn wire28_429_retry_after_zero_forever_ends_as_rate_limited() {
    let p =
        answering(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 0\r\ncontent-length: 0\r\n\r\n")
            .await;
    let out = within(5, client(MS(500)).oneshot(get(&p.url("/a")))).await;
    assert_eq!(p.seen.requests(), 4);
    let err = out.expect_err("the last 429 came back as a response");
    assert_eq!(
        sturdy::core::find::<RateLimited>(&*err)
            .unwrap()
            .retry_after(),
        Duration::ZERO
    );
}

#[tokio::test]
async fn wire28_a_dropped_call_abandons_its_tls_handshake() {
    let p = peer(|mut c| async move {
        c.read_some().await;
        c.wait_close().await;
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_attempt_timeout(MS(5000))
        .build(sturdy::tls::https_client());
    let url = format!("https://{}/a", p.addr);
    let out = tokio::time::timeout(MS(50), client.oneshot(get(&url))).await;
    assert!(out.is_err());
    assert!(
        eventually(|| p.seen.closed() == 1).await,
        "the handshake's connection stayed open"
    );
    tokio::time::sleep(MS(100)).await;
    assert_eq!(p.seen.conns(), 1);
}

#[tokio::test]
async fn wire28_summary_of_a_body_cut_short() {
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            c.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
                .await;
        }
    })
    .await;
    let res = within(5, client(MS(500)).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    let err = within(5, res.into_body().collect()).await.unwrap_err();
    let s = ErrorSummary::of(&err);
    assert!(s.may_have_been_processed);
    assert_ne!(s.kind, "other", "{s:?}");
    assert!(!s.message.is_empty());
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
}

#[tokio::test]
async fn wire28_a_503_storm_then_recovery_through_the_breaker() {
    // 503s count as failures: with a streak trigger of 2 the breaker opens, and after its open
    // period a probe that succeeds closes it.
    let p = peer(|mut c| async move {
        while c.read_request().await.is_some() {
            let answer: &[u8] = if c.seen.requests() <= 2 {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
            } else {
                OK
            };
            if !c.write(answer).await {
                return;
            }
        }
    })
    .await;
    let (breaker, handle) = sturdy::circuit::CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_open_duration(MS(80), MS(80))
        .pair();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_circuit_breaker(breaker)
        .with_attempt_timeout(MS(500))
        .build(hyper_client());
    let out = within(5, client.clone().oneshot(get(&p.url("/a")))).await;
    assert_eq!(p.seen.requests(), 2, "{out:?}");
    tokio::time::sleep(MS(100)).await;
    let res = within(5, client.clone().oneshot(get(&p.url("/b"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let state = format!("{:?}", handle.state(&p.authority()));
    assert!(state.contains("Closed"), "{state}");
}

fn coalescing() -> sturdy::Client<sturdy::coalesce::ResponseBody<hyper::body::Incoming>> {
    ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_coalesce(sturdy::coalesce::CoalesceLayer::new())
        .with_attempt_timeout(MS(500))
        .build(hyper_client())
}

#[tokio::test]
async fn wire28_coalesced_callers_each_learn_a_huge_retry_after_capped() {
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            tokio::time::sleep(MS(30)).await;
            c.write(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 99999999999999\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    })
    .await;
    let client = coalescing();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let c = client.clone();
            let url = p.url("/same");
            tokio::spawn(async move { c.oneshot(get(&url)).await })
        })
        .collect();
    for call in calls {
        let err = within(5, call).await.unwrap().unwrap_err();
        assert_eq!(
            sturdy::core::find::<RateLimited>(&*err)
                .expect("no RateLimited in a shared error")
                .retry_after(),
            Duration::from_secs(300)
        );
        assert!(err.to_string().ends_with("retry after 5m"), "{err}");
        let s = ErrorSummary::of(&*err);
        assert_eq!(s.kind, "rate_limited");
        assert_eq!(s.retry_after_ms, Some(300_000));
    }
    assert_eq!(p.seen.requests(), 1);
}

#[tokio::test]
async fn wire28_coalesced_callers_get_the_cause_of_a_malformed_answer() {
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            tokio::time::sleep(MS(30)).await;
            c.write(b"HTTP/1.1 2x0 OK\r\n\r\n").await;
        }
    })
    .await;
    let client = coalescing();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let c = client.clone();
            let url = p.url("/same");
            tokio::spawn(async move { c.oneshot(get(&url)).await })
        })
        .collect();
    for call in calls {
        let err = within(5, call).await.unwrap().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(
                "the server sent an invalid HTTP response (invalid HTTP status-code parsed)"
            ),
            "{msg}"
        );
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    }
}
