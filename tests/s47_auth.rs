//! The auth guide's bounded waits against a token endpoint that stalls (accepts and never reads,
//! reads and never answers, sends a head and half a body): `with_token_timeout` ends the call's
//! wait, `with_request_timeout` ends the token request itself (its whole answer), a failed
//! request backs off 1 s during which a caller gets the last error at once, the builder's attempt
//! timeout and deadline bound the wait, and the refresh of a token near its expiry does not hold
//! callers. Each failure must say `NotSent` and name the endpoint; the API must see nothing; the
//! same kept service must serve the next call. Real time on loopback.
#![cfg(feature = "full")]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::core::classify::delivery;
use sturdy::core::{CallOptions, Delivery, ErrorKind};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

use crate::s47_util::{get, post, Peer, Phase, Rng};

type Kept = BoxCloneSyncService<Request<Full<Bytes>>, Response<hyper::body::Incoming>, BoxError>;

fn creds(token: &Peer, request_timeout: Duration) -> ClientCredentials {
    ClientCredentials::new(
        sturdy_chaos::http_client(),
        &token.url("/oauth/token"),
        "s47-client",
        "s47-secret",
    )
    .unwrap()
    .with_request_timeout(request_timeout)
}

fn kept(layer: AuthLayer) -> Kept {
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(tower::buffer::BufferLayer::new(4))
            .layer(tower::limit::ConcurrencyLimitLayer::new(1))
            .layer(layer)
            .service(sturdy_chaos::http_client()),
    )
}

async fn call(
    svc: &mut Kept,
    req: Request<Full<Bytes>>,
    bound: Duration,
) -> Result<Response<hyper::body::Incoming>, BoxError> {
    tokio::time::timeout(bound, async { svc.ready().await?.call(req).await })
        .await
        .expect("the call hung past the test's bound")
}

fn kind(err: &BoxError) -> ErrorKind {
    sturdy::core::find::<sturdy::core::Error>(&**err)
        .expect("a sturdy error")
        .kind()
        .clone()
}

fn stall_phases() -> [Phase; 3] {
    [Phase::Silent, Phase::ReadNoHead, Phase::TokenHeadMidBody]
}

#[tokio::test]
async fn the_token_timeout_ends_the_wait_for_a_stalled_token_endpoint() {
    for phase in stall_phases() {
        let (token, api) = (Peer::start(phase).await, Peer::start(Phase::Healthy).await);
        let mut svc = kept(
            AuthLayer::oauth2(creds(&token, Duration::from_secs(30)))
                .with_token_timeout(Duration::from_millis(100)),
        );
        let t0 = Instant::now();
        let err = call(&mut svc, post(&api.url("/orders")), Duration::from_secs(3))
            .await
            .expect_err("no token, no call");
        let took = t0.elapsed();
        let text = err.to_string();
        assert!(
            took <= Duration::from_millis(300),
            "{phase:?}: {took:?}: {text}"
        );
        assert_eq!(kind(&err), ErrorKind::Timeout, "{phase:?}: {text}");
        assert_eq!(delivery(&*err), Delivery::NotSent, "{phase:?}: {text}");
        assert!(
            text.contains(&token.url("/oauth/token")),
            "{phase:?}: {text}"
        );
        assert!(text.contains("100ms"), "{phase:?}: {text}");
        assert!(text.contains("not sent"), "{phase:?}: {text}");
        assert_eq!(api.accepts(), 0, "{phase:?}: the API was called");
        // The kept service is free again: its readiness is immediate.
        tokio::time::timeout(Duration::from_millis(100), svc.ready())
            .await
            .expect("the permit of the failed call was not given back")
            .unwrap();
    }
}

/// `with_request_timeout` covers "sending it and reading the whole answer"; then the source backs
/// off 1 s, during which "a caller with no valid token during the backoff gets the last error at
/// once"; after it, a new request is made and the same kept service proceeds.
#[tokio::test]
async fn the_request_timeout_ends_a_stalled_token_request_and_backs_off() {
    for phase in stall_phases() {
        let (token, api) = (Peer::start(phase).await, Peer::start(Phase::Healthy).await);
        let mut svc = kept(
            AuthLayer::oauth2(creds(&token, Duration::from_millis(150)))
                .with_token_timeout(Duration::from_secs(2)),
        );
        let t0 = Instant::now();
        let err = call(&mut svc, get(&api.url("/a")), Duration::from_secs(3))
            .await
            .expect_err("no token, no call");
        let took = t0.elapsed();
        let text = err.to_string();
        assert!(
            took <= Duration::from_millis(450),
            "{phase:?}: {took:?}: {text}"
        );
        assert!(
            took >= Duration::from_millis(140),
            "{phase:?}: {took:?}: {text}"
        );
        assert_eq!(kind(&err), ErrorKind::Timeout, "{phase:?}: {text}");
        assert_eq!(delivery(&*err), Delivery::NotSent, "{phase:?}: {text}");
        assert!(text.contains("/oauth/token"), "{phase:?}: {text}");
        // During the backoff: the last error, at once, and no new token request.
        token.set(Phase::Token);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t1 = Instant::now();
        let err2 = call(&mut svc, get(&api.url("/a")), Duration::from_secs(3))
            .await
            .expect_err("in the backoff");
        assert!(
            t1.elapsed() <= Duration::from_millis(60),
            "{phase:?}: {:?}",
            t1.elapsed()
        );
        assert_eq!(delivery(&*err2), Delivery::NotSent, "{phase:?}: {err2}");
        assert_eq!(token.accepts(), 1, "{phase:?}: the endpoint was hammered");
        assert_eq!(api.accepts(), 0, "{phase:?}");
        // After the backoff (1 s from the failure), a new request gets a token.
        let wait = Duration::from_millis(1250).saturating_sub(t0.elapsed());
        tokio::time::sleep(wait).await;
        let res = call(&mut svc, get(&api.url("/a")), Duration::from_secs(2))
            .await
            .expect("after the backoff a new token request succeeds");
        assert_eq!(res.status(), 200);
        assert_eq!(api.seen().len(), 1);
    }
}

/// In a `ClientBuilder` stack the wait for a token is bounded by the attempt timeout and the
/// deadline: "the overall deadline of 200ms passed while attempt 1 waited for an access token,
/// before it was sent".
#[tokio::test]
async fn the_deadline_ends_a_wait_for_a_stalled_token_endpoint_in_the_builder() {
    for phase in stall_phases() {
        let (token, api) = (Peer::start(phase).await, Peer::start(Phase::Healthy).await);
        let client = ClientBuilder::new()
            .with_auth(AuthLayer::oauth2(creds(&token, Duration::from_secs(30))))
            .with_attempt_timeout(Duration::from_secs(5))
            .build(sturdy_chaos::http_client());
        let mut req = post(&api.url("/orders"));
        req.extensions_mut()
            .insert(CallOptions::new().with_deadline(Duration::from_millis(200)));
        let t0 = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(3), client.oneshot(req))
            .await
            .expect("hung")
            .expect_err("no token");
        let took = t0.elapsed();
        let text = err.to_string();
        assert!(
            took <= Duration::from_millis(600),
            "{phase:?}: {took:?}: {text}"
        );
        assert_eq!(kind(&err), ErrorKind::Timeout, "{phase:?}: {text}");
        assert_eq!(delivery(&*err), Delivery::NotSent, "{phase:?}: {text}");
        assert!(text.contains("200ms"), "{phase:?}: {text}");
        assert!(text.contains("access token"), "{phase:?}: {text}");
        assert!(
            !text.contains("may have been processed"),
            "{phase:?}: {text}"
        );
        assert_eq!(api.accepts(), 0, "{phase:?}");
    }
}

#[tokio::test]
async fn the_attempt_timeout_ends_a_wait_for_a_stalled_token_endpoint_in_the_builder() {
    let (token, api) = (
        Peer::start(Phase::ReadNoHead).await,
        Peer::start(Phase::Healthy).await,
    );
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(creds(&token, Duration::from_secs(30))))
        .with_attempt_timeout(Duration::from_millis(100))
        .build(sturdy_chaos::http_client());
    let mut req = post(&api.url("/orders"));
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let t0 = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(3), client.oneshot(req))
        .await
        .expect("hung")
        .expect_err("no token");
    let took = t0.elapsed();
    let text = err.to_string();
    assert!(took <= Duration::from_millis(300), "{took:?}: {text}");
    assert_eq!(kind(&err), ErrorKind::Timeout, "{text}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{text}");
    assert!(text.contains("not sent"), "{text}");
    assert_eq!(api.accepts(), 0);
}

/// "reused until `expiry - min(60 s, lifetime / 2)`, then refreshed in the background while
/// callers go on with the still-valid token": a stalled refresh must not hold callers.
#[tokio::test]
async fn a_stalled_background_refresh_does_not_hold_callers() {
    let (token, api) = (
        Peer::start(Phase::TokenShort).await,
        Peer::start(Phase::Healthy).await,
    );
    let mut svc = kept(
        AuthLayer::oauth2(creds(&token, Duration::from_secs(30)))
            .with_token_timeout(Duration::from_secs(2)),
    );
    let res = call(&mut svc, get(&api.url("/a")), Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let t0 = Instant::now();
    token.set(Phase::ReadNoHead);
    // Lifetime 2 s: refreshed from 1 s on. At 1.1 s and 1.5 s, the still-valid token serves.
    for at in [1100u64, 1500] {
        tokio::time::sleep_until(t0 + Duration::from_millis(at)).await;
        let t = Instant::now();
        let res = call(&mut svc, get(&api.url("/a")), Duration::from_secs(3))
            .await
            .expect("the still-valid token serves the call");
        assert_eq!(res.status(), 200);
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "a caller with a valid token waited {:?} for the refresh",
            t.elapsed()
        );
    }
    assert!(token.seen().len() >= 2, "no background refresh was started");
}

/// A call waiting for a token is dropped at a seeded moment: the kept service's permit comes
/// back at once, the API sees nothing, and once tokens come again the next call proceeds.
#[tokio::test]
async fn a_call_dropped_while_waiting_for_a_token_frees_the_kept_service() {
    let mut rng = Rng(47_2026);
    for _ in 0..2 {
        let (token, api) = (
            Peer::start(Phase::ReadNoHead).await,
            Peer::start(Phase::Healthy).await,
        );
        let mut svc = kept(
            AuthLayer::oauth2(creds(&token, Duration::from_millis(200)))
                .with_token_timeout(Duration::from_secs(2)),
        );
        let at = Duration::from_millis(rng.between(10, 180));
        let req = post(&api.url("/orders"));
        let r = tokio::time::timeout(at, async { svc.ready().await?.call(req).await }).await;
        assert!(r.is_err(), "the call ended before the drop at {at:?}");
        tokio::time::timeout(Duration::from_millis(100), svc.ready())
            .await
            .expect("the dropped call kept its permit")
            .unwrap();
        token.set(Phase::Token);
        // The request goes on for the others and fails at 200 ms; then backs off 1 s.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let res = call(&mut svc, get(&api.url("/after")), Duration::from_secs(2))
            .await
            .expect("the next call proceeds");
        assert_eq!(res.status(), 200);
        assert_eq!(api.seen().len(), 1, "the dropped POST reached the API");
        assert_eq!(api.seen()[0].path, "/after");
    }
}
