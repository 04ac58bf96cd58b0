//! Configuration at its edges (zero waits, zero limits, zero bounds) read against the sentences
//! that say what such a value means.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::time::Duration;

use http::StatusCode;
use outsider_common::*;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::classify::delivery;
use sturdy::core::{CallOptions, Delivery, ErrorKind};
use sturdy::paginate::{JsonCursor, Paginate};
use sturdy::retry::RetryLayer;
use tokio::time::{timeout, Instant};
use tower::{Layer, ServiceExt};

const HOST: &str = "api.example.com";
const BOUND: Duration = Duration::from_secs(30);

fn token_answer() -> Answer {
    Answer::Status(
        200,
        vec![("content-type", "application/json".to_owned())],
        r#"{"access_token":"tok-z","token_type":"Bearer","expires_in":3600}"#,
    )
}

/// docs/guides/auth.md: "A cached token needs no wait, so `Duration::ZERO` means \"the cached
/// token or fail at once\"" and "Past it the call fails with a `sturdy_core::Error` of kind
/// `Timeout` (retryable) naming the token endpoint ... The token request goes on, and later
/// callers share it."
#[tokio::test(start_paused = true)]
async fn a_token_timeout_of_zero_fails_at_once_and_the_request_goes_on() {
    let idp = Api::new(vec![], after(Duration::from_millis(200), token_answer()));
    let api = Api::new(vec![], ok());
    let tokens = ClientCredentials::new(
        idp.service(),
        "http://idp.local/oauth/token?tenant=secret-tenant",
        "id",
        "client-secret-xyz",
    )
    .unwrap();
    let svc = AuthLayer::oauth2(tokens)
        .with_token_timeout(Duration::ZERO)
        .layer(api.service());
    let t0 = Instant::now();
    let err = timeout(BOUND, svc.clone().oneshot(get(&format!("http://{HOST}/a"))))
        .await
        .unwrap()
        .expect_err("no cached token yet");
    assert!(
        t0.elapsed() < Duration::from_millis(50),
        "{:?}",
        t0.elapsed()
    );
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).expect("a sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{err}");
    let text = err.to_string();
    assert!(text.contains("http://idp.local/oauth/token"), "{text}");
    assert!(
        !text.contains("secret-tenant") && !text.contains("client-secret-xyz"),
        "{text}"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(api.calls(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let res = svc
        .clone()
        .oneshot(get(&format!("http://{HOST}/b")))
        .await
        .expect("the token request did not go on");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(idp.calls(), 1);
}

/// docs/guides/circuit.md: "Setters never panic; values that cannot work are taken as the
/// nearest that can (0 probes is 1)." and sturdy-circuit rustdoc, `with_consecutive_failures`:
/// "0 turns this trigger off". Zero probes and zero successes to close do not panic; a 503
/// after three successes leaves the breaker closed (no streak trigger, far below the volume).
#[tokio::test(start_paused = true)]
async fn a_streak_trigger_of_zero_is_off_and_zero_probes_do_not_panic() {
    let api = Api::new(vec![ok(), ok(), ok(), status(503)], ok());
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(0)
        .with_probes(0)
        .with_successes_to_close(0)
        .pair();
    let svc = layer.layer(api.service());
    for i in 0..3 {
        let res = svc
            .clone()
            .oneshot(get(&format!("http://{HOST}/{i}")))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(handle.state(HOST), Some(CircuitState::Closed), "after {i}");
    }
    let res = svc
        .clone()
        .oneshot(get(&format!("http://{HOST}/f")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
    handle.force_open(HOST);
    tokio::time::sleep(Duration::from_secs(1)).await;
    handle.force_close(HOST);
    let res = svc.oneshot(get(&format!("http://{HOST}/g"))).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// docs/RELIABILITY.md: "request bodies kept for a replay | 1 MiB ...; larger or unbounded ones
/// are sent once". With a body limit of zero, a keyed POST with a body is sent once, while an
/// empty one still fits and is retried.
#[tokio::test(start_paused = true)]
async fn a_retry_body_limit_of_zero_sends_bodies_once_and_still_retries_empty_ones() {
    let api = Api::new(vec![status(503), status(503)], ok());
    let svc = RetryLayer::new()
        .with_body_limit(0)
        .with_seed(4)
        .layer(api.service());
    let mut req = post(&format!("http://{HOST}/orders"), "{\"a\":1}");
    req.headers_mut()
        .insert("idempotency-key", "k-body".parse().unwrap());
    let res = timeout(BOUND, svc.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.calls(), 1, "a body over the limit was replayed");
    let mut req = post(&format!("http://{HOST}/orders"), "");
    req.headers_mut()
        .insert("idempotency-key", "k-empty".parse().unwrap());
    let res = timeout(BOUND, svc.oneshot(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 3);
}

/// docs/guides/paginate.md: "`page(cursor, limit)` returns `{ items, has_more, next_cursor }`;
/// the cursor is opaque and resumes exactly after the last item returned" and `with_max_items`
/// bounds "the largest `limit` a `page()` call honours". A limit of zero neither hangs nor hands
/// back a cursor that makes no progress forever; `usize::MAX` is capped.
#[tokio::test(start_paused = true)]
async fn page_limits_of_zero_and_usize_max() {
    let api = Api::new(
        vec![],
        Answer::Status(
            200,
            vec![("content-type", "application/json".to_owned())],
            r#"{"data":[1,2,3],"next":null}"#,
        ),
    );
    let pager = Paginate::builder(
        api.service(),
        &format!("http://{HOST}/items"),
        JsonCursor::new("/data", "/next"),
    )
    .with_max_items(2)
    .build()
    .unwrap();
    let zero = timeout(BOUND, pager.page(None, 0)).await.expect("hung");
    if let Ok(p) = &zero {
        assert!(p.items.is_empty() || p.items.len() <= 2, "{p:?}");
        if p.items.is_empty() {
            assert!(
                p.next_cursor.is_none() || !p.has_more || p.items.is_empty(),
                "{p:?}"
            );
        }
    }
    let big = timeout(BOUND, pager.page(None, usize::MAX))
        .await
        .expect("hung")
        .unwrap();
    assert!(big.items.len() <= 2, "{} items", big.items.len());
    if let Some(c) = big.next_cursor.as_deref() {
        let rest = timeout(BOUND, pager.page(Some(c), 10))
            .await
            .expect("hung")
            .unwrap();
        assert_eq!(big.items.len() + rest.items.len(), 3);
    }
}

/// docs/guides/retry.md: "`CallOptions` ... `.with_max_attempts(n)`, `.with_deadline(d)`"; a
/// deadline of zero sends nothing (or at most the first attempt) and never sleeps; one attempt
/// per request is honoured whatever the layer says.
#[tokio::test(start_paused = true)]
async fn per_request_zero_deadline_and_one_attempt() {
    let api = Api::new(vec![], status_h(503, &[("retry-after", "1")]));
    let svc = RetryLayer::new().with_seed(6).layer(api.service());
    let mut req = get(&format!("http://{HOST}/z"));
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::ZERO));
    let t0 = Instant::now();
    let _ = timeout(BOUND, svc.clone().oneshot(req))
        .await
        .expect("hung");
    assert!(
        t0.elapsed() < Duration::from_millis(10),
        "{:?}",
        t0.elapsed()
    );
    assert!(api.calls() <= 1);
    let before = api.calls();
    let mut req = get(&format!("http://{HOST}/one"));
    req.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(1));
    let _ = timeout(BOUND, svc.oneshot(req)).await.expect("hung");
    assert_eq!(api.calls(), before + 1);
}

/// docs/guides/paginate.md: "A page that is not the expected JSON is named by its number" and
/// RELIABILITY.md: "Every header, body, cursor ... is input an attacker (or a broken API)
/// controls". A page and a token response of 200,000 nested brackets are refused with an error,
/// never a stack overflow.
#[tokio::test(start_paused = true)]
async fn deeply_nested_json_pages_and_token_responses_are_errors() {
    let deep: &'static str =
        Box::leak(format!("{{\"data\":{}", "[".repeat(200_000)).into_boxed_str());
    let api = Api::new(
        vec![],
        Answer::Status(
            200,
            vec![("content-type", "application/json".to_owned())],
            deep,
        ),
    );
    let pager = Paginate::new(
        api.service(),
        &format!("http://{HOST}/items"),
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let err = tokio::spawn(async move { pager.page(None, 10).await })
        .await
        .expect("the page panicked")
        .expect_err("a page of brackets was accepted");
    assert!(
        err.to_string().contains('1'),
        "the page is not named: {err}"
    );
    let idp = Api::new(
        vec![],
        Answer::Status(
            200,
            vec![("content-type", "application/json".to_owned())],
            Box::leak(format!("{{\"access_token\":{}", "[".repeat(60_000)).into_boxed_str()),
        ),
    );
    let tokens = ClientCredentials::new(idp.service(), "http://idp.local/t", "id", "s").unwrap();
    let got = tokio::spawn(async move { tokens.get().await })
        .await
        .expect("the token response panicked");
    assert!(got.is_err());
}
