//! Hostile peers against single mechanics of the composed client: an OAuth2 token endpoint that
//! stalls, resets or answers nonsense; a shared (coalesced) body cut short; a half-open
//! breaker's probe that stalls; a pause whose released calls never answer.

use std::time::Duration;

use http_body_util::BodyExt;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{CallOptions, CircuitOpen, Delivery, ErrorKind};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::wire28_util::*;

const MS: fn(u64) -> Duration = Duration::from_millis;
const CLIENT_SECRET: &str = "cs-SECRET-wire28";

async fn api_and_token(token: Peer) -> (Peer, sturdy::Client<hyper::body::Incoming>, Peer) {
    let api = answering(OK).await;
    let tokens = ClientCredentials::new(
        hyper_client(),
        &token.url("/oauth/token"),
        "client-28",
        CLIENT_SECRET,
    )
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .with_auth(AuthLayer::oauth2(tokens))
        .with_attempt_timeout(MS(150))
        .build(hyper_client());
    (api, client, token)
}

fn no_secret(err: &sturdy::core::BoxError) {
    let texts = every_text(&**err);
    assert!(!texts.contains(CLIENT_SECRET), "{texts}");
    assert!(
        !texts.contains("Y2xpZW50LTI4"),
        "basic credentials in {texts}"
    );
}

#[tokio::test]
async fn wire28_token_endpoint_that_stalls_fails_the_call_not_sent() {
    let token = peer(|mut c| async move {
        c.read_request().await;
        c.wait_close().await;
    })
    .await;
    let (api, client, token) = api_and_token(token).await;
    let start = Instant::now();
    let err = within(5, client.clone().oneshot(post(&api.url("/orders"))))
        .await
        .unwrap_err();
    assert!(start.elapsed() < MS(1500), "{:?}", start.elapsed());
    assert_eq!(api.seen.requests(), 0);
    assert!(token.seen.requests() >= 1);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    no_secret(&err);
    // The API's breaker (one failure opens it) did not count the token endpoint's stall.
    let err = within(5, client.oneshot(get(&api.url("/x"))))
        .await
        .unwrap_err();
    assert!(
        sturdy::core::find::<CircuitOpen>(&*err).is_none(),
        "the API's breaker opened: {err}"
    );
}

#[tokio::test]
async fn wire28_token_endpoint_that_resets_keeps_the_secret_out() {
    let token = peer(|mut c| async move {
        c.read_request().await;
        c.reset();
    })
    .await;
    let (api, client, token) = api_and_token(token).await;
    let err = within(5, client.oneshot(post(&api.url("/orders"))))
        .await
        .unwrap_err();
    assert_eq!(api.seen.requests(), 0);
    assert!(token.seen.requests() >= 1);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    no_secret(&err);
    // The request did carry the secret (so the check above means something).
    let heads = token.seen.heads().join("\n");
    assert!(
        heads.to_lowercase().contains("authorization: basic") || heads.contains("client-28"),
        "{heads}"
    );
}

#[tokio::test]
async fn wire28_token_endpoint_with_a_huge_body_is_bounded() {
    let token = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            let body = format!(
                "{{\"access_token\":\"{}\",\"expires_in\":3600}}",
                "a".repeat(1024 * 1024)
            );
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            c.write(head.as_bytes()).await;
            c.write(body.as_bytes()).await;
        }
    })
    .await;
    let (api, client, _token) = api_and_token(token).await;
    let err = within(5, client.oneshot(get(&api.url("/orders"))))
        .await
        .unwrap_err();
    assert_eq!(api.seen.requests(), 0);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    no_secret(&err);
}

#[tokio::test]
async fn wire28_token_endpoint_with_a_negative_lifetime_is_no_refresh_loop() {
    let token = answering(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 41\r\n\r\n{\"access_token\":\"tok-x\",\"expires_in\":-50}",
    )
    .await;
    let (api, client, token) = api_and_token(token).await;
    for _ in 0..3 {
        let err = within(5, client.clone().oneshot(get(&api.url("/orders"))))
            .await
            .unwrap_err();
        assert!(
            !err.to_string().contains("within 150ms"),
            "the token response was not read: {err}"
        );
    }
    assert!(
        token.seen.requests() <= 12,
        "{} token requests",
        token.seen.requests()
    );
    assert_eq!(api.seen.requests(), 0);
}

#[tokio::test]
async fn wire28_token_endpoint_answering_garbage_names_the_endpoint() {
    let token = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nnot json!").await;
    let (api, client, token) = api_and_token(token).await;
    let err = within(5, client.oneshot(get(&api.url("/orders"))))
        .await
        .unwrap_err();
    assert_eq!(api.seen.requests(), 0);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let msg = err.to_string();
    assert!(msg.contains(&token.authority()), "{msg}");
    no_secret(&err);
}

#[tokio::test]
async fn wire28_coalesced_body_cut_short_is_a_shared_body_error() {
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            c.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                .await;
            tokio::time::sleep(MS(30)).await;
        }
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_coalesce(CoalesceLayer::new())
        .with_attempt_timeout(MS(500))
        .build(hyper_client());
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let c = client.clone();
            let url = p.url("/same");
            tokio::spawn(async move { c.oneshot(get(&url)).await })
        })
        .collect();
    for call in calls {
        let err = within(5, call).await.unwrap().unwrap_err();
        assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Body, "{err}");
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
        assert!(
            err.to_string()
                .starts_with("the call shared by identical requests in flight failed: "),
            "{err}"
        );
    }
    assert_eq!(p.seen.requests(), 1);
}

#[tokio::test]
async fn wire28_half_open_probe_that_stalls_keeps_others_out_and_reopens() {
    // First connection resets (the breaker opens); every later one stalls.
    let p = peer(|mut c| async move {
        if c.index == 0 {
            c.read_request().await;
            c.reset();
            return;
        }
        c.read_request().await;
        c.wait_close().await;
    })
    .await;
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(MS(50), MS(50))
        .pair();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_circuit_breaker(breaker)
        .with_attempt_timeout(MS(200))
        .build(hyper_client());
    let once = |path: &str| {
        let mut r = get(&p.url(path));
        r.extensions_mut()
            .insert(CallOptions::new().without_retries());
        r
    };
    let _ = within(5, client.clone().oneshot(once("/a")))
        .await
        .unwrap_err();
    tokio::time::sleep(MS(70)).await;
    let probe = {
        let c = client.clone();
        let r = once("/probe");
        tokio::spawn(async move { c.oneshot(r).await })
    };
    assert!(eventually(|| p.seen.requests() == 2).await);
    let start = Instant::now();
    let err = within(5, client.clone().oneshot(once("/other")))
        .await
        .unwrap_err();
    assert!(start.elapsed() < MS(150));
    let open = sturdy::core::find::<CircuitOpen>(&*err).expect("not refused");
    assert_eq!(open.retry_in(), Duration::ZERO);
    assert_eq!(p.seen.requests(), 2);
    let err = within(5, probe).await.unwrap().unwrap_err();
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout);
    let state = format!("{:?}", handle.state(&p.authority()));
    assert!(state.contains("Open"), "{state}");
}

#[tokio::test]
async fn wire28_released_calls_that_never_answer_do_not_hold_the_line_forever() {
    // The first answer pauses the host for 1 s; every later request stalls. Calls that waited
    // for the pause are released by slow start; each released one is cut by its attempt
    // timeout and gives its place back.
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            if c.seen.requests() == 1 {
                c.write(
                    b"HTTP/1.1 200 OK\r\nratelimit: \"q\";r=0;t=1\r\ncontent-length: 0\r\n\r\n",
                )
                .await;
                // The kept-alive connection carries the next request.
                if c.read_request().await.is_none() {
                    return;
                }
            }
            c.wait_close().await;
        }
    })
    .await;
    let client = client(MS(150));
    within(5, client.clone().oneshot(get(&p.url("/first"))))
        .await
        .unwrap();
    let start = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let c = client.clone();
            let mut r = get(&p.url(&format!("/w{i}")));
            r.extensions_mut()
                .insert(CallOptions::new().without_retries());
            tokio::spawn(async move { c.oneshot(r).await })
        })
        .collect();
    for call in calls {
        let err = within(5, call).await.unwrap().unwrap_err();
        assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout, "{err}");
    }
    let took = start.elapsed();
    assert!(took >= MS(900) && took < MS(2500), "{took:?}");
    assert_eq!(p.seen.requests(), 5);
}

#[tokio::test]
async fn wire28_body_of_a_kept_response_read_after_the_deadline() {
    // The deadline bounds the call until the head arrives; the body that follows (sent slowly,
    // but steadily) is the caller's to read, past the deadline.
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            c.write(b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n")
                .await;
            c.drip(b"abcdefghijklmnopqrst", MS(20)).await;
        }
    })
    .await;
    let mut req = get(&p.url("/a"));
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(MS(100)));
    let res = within(5, client(MS(100)).oneshot(req)).await.unwrap();
    let body = within(5, res.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), 20);
}
