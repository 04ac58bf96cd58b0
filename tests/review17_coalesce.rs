//! `ClientBuilder::with_coalesce` with per-request deadlines (`CallOptions::with_deadline`: "an
//! overall deadline for this request: attempts and waits together, until the response head
//! arrives").
#![cfg(feature = "full")]

use crate::outsider_common;
use std::time::Duration;

use http::StatusCode;
use outsider_common::*;
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::CallOptions;
use sturdy::ClientBuilder;
use tokio::time::{timeout, Instant};
use tower::ServiceExt;

const U: &str = "http://api.example.com/report";
const LIMIT: Duration = Duration::from_secs(60);

fn get_with(options: Option<CallOptions>) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = get(U);
    if let Some(o) = options {
        req.extensions_mut().insert(o);
    }
    req
}

/// A request with a 200 ms deadline identical to a call in flight (which has none and takes 5 s)
/// ends by its own deadline: it carries `CallOptions`, so it goes on its own (coalesce guide).
#[tokio::test(start_paused = true)]
async fn a_joiner_keeps_its_own_deadline() {
    let api = Api::new(vec![Answer::Slow(Duration::from_secs(5))], ok());
    let client = ClientBuilder::new()
        .with_coalesce(CoalesceLayer::new())
        .build(api.service());
    let leader = tokio::spawn(client.clone().oneshot(get_with(None)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let start = Instant::now();
    let joined = timeout(
        LIMIT,
        client.clone().oneshot(get_with(Some(
            CallOptions::new().with_deadline(Duration::from_millis(200)),
        ))),
    )
    .await
    .expect("no hang");
    let took = start.elapsed();
    assert_eq!(
        api.calls(),
        2,
        "a request with its own settings goes on its own"
    );
    assert!(
        took <= Duration::from_millis(250),
        "took {took:?}: {:?}",
        joined.map(|r| r.status())
    );
    let _ = leader.await;
}

/// The other way round: the leader has a 200 ms deadline, the joiner none. The joiner's request
/// has no deadline; it should not fail with the leader's.
#[tokio::test(start_paused = true)]
async fn a_joiner_without_a_deadline_does_not_fail_by_the_leaders() {
    let api = Api::new(vec![Answer::Slow(Duration::from_secs(1))], ok());
    let client = ClientBuilder::new()
        .with_coalesce(CoalesceLayer::new())
        .build(api.service());
    let leader = tokio::spawn(client.clone().oneshot(get_with(Some(
        CallOptions::new().with_deadline(Duration::from_millis(200)),
    ))));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let joined = timeout(LIMIT, client.clone().oneshot(get_with(None)))
        .await
        .expect("no hang");
    let _ = leader.await;
    match joined {
        Ok(res) => assert_eq!(res.status(), StatusCode::OK),
        Err(e) => panic!("the joiner failed: {e}"),
    }
}
