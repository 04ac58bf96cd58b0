//! docs/guides/agents.md, every sentence a test can check: one `ClientBuilder` client per
//! session (`Clone + Send + Sync`, token caches carried over), `tool_result` in the MCP shape of
//! the guide's example, `ErrorSummary`'s fields and `advice()`, "may have been processed" false
//! only when nothing reached the server, and a deadline that ends while attempt 1 waits for its
//! first token in a `ClientBuilder` stack (docs/guides/auth.md, "Errors").

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;
use sturdy::auth::AuthLayer;
use sturdy::core::summary::tool_result;
use sturdy::core::{BoxError, CallOptions, Delivery, ErrorSummary, RateLimited};
use sturdy::ClientBuilder;
use tower::ServiceExt;

use crate::s43_util::{get, post, source, status_json, token_json, Answer, Api, Endpoint};

const API: &str = "https://api.example.com/v1/orders";

#[test]
fn the_session_client_is_clone_send_sync() {
    fn clone_send_sync<T: Clone + Send + Sync + 'static>() {}
    clone_send_sync::<sturdy::Client<Full<Bytes>>>();
}

#[tokio::test(start_paused = true)]
async fn the_guides_rate_limited_example_comes_out_as_shown() {
    let api = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(StatusCode::TOO_MANY_REQUESTS)
                .header("retry-after", "120")
                .body(())
                .unwrap(),
        )
    });
    let client = tower::ServiceBuilder::new()
        .layer(sturdy::retry::RetryLayer::new())
        .service(api);
    let err: BoxError = client
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap_err();
    let v = tool_result::<()>(Err(err));
    assert_eq!(v["isError"], json!(true));
    assert_eq!(v["content"][0]["type"], json!("text"));
    assert_eq!(
        v["content"][0]["text"],
        json!("rate limited by api.example.com; retry after 2m\nTry again in 2m; it may already have been processed, so check before sending it again.")
    );
    let mut e = v["structuredContent"]["error"].clone();
    e["message"] = json!("...");
    assert_eq!(
        e,
        json!({
            "kind": "rate_limited", "status": null, "message": "...", "retryable": true,
            "retry_after_ms": 120000, "may_have_been_processed": true,
            "idempotency_key": null, "attempts": 1
        })
    );
}

#[test]
fn on_success_the_text_is_the_value_as_json_and_structured_content_the_result() {
    let v = tool_result(Ok::<_, BoxError>(json!({"id": 7, "ok": true})));
    assert_eq!(v["isError"], json!(false));
    assert_eq!(
        v["structuredContent"],
        json!({"result": {"id": 7, "ok": true}})
    );
    let text = v["content"][0]["text"].as_str().unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(text).unwrap(),
        json!({"id": 7, "ok": true})
    );
}

/// agents.md: "On success the text is the value as JSON (a string value as the string itself,
/// without quotes)" (s43 found the string case unsaid); and a value JSON cannot hold is a tool
/// error that says so, not a `null` result.
#[test]
fn on_success_a_string_value_is_its_own_text_and_a_value_json_cannot_hold_is_an_error() {
    let v = tool_result(Ok::<_, BoxError>("hello".to_owned()));
    assert_eq!(v["content"][0]["text"], json!("hello"));
    assert_eq!(v["structuredContent"], json!({"result": "hello"}));
    let mut m = std::collections::HashMap::new();
    m.insert(vec![1u8], 1);
    let v = tool_result(Ok::<_, BoxError>(m));
    assert_eq!(v["isError"], json!(true));
    assert!(v.get("structuredContent").is_none());
    let text = v["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("could not be written as JSON"), "{text}");
}

#[test]
fn an_error_summary_has_the_documented_fields_and_advice() {
    let s = ErrorSummary::of(&RateLimited::new(Duration::from_secs(30)));
    let v = serde_json::to_value(&s).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "attempts",
            "idempotency_key",
            "kind",
            "may_have_been_processed",
            "message",
            "retry_after_ms",
            "retryable",
            "status"
        ]
    );
    assert_eq!(s.kind, "rate_limited");
    assert_eq!(s.retry_after_ms, Some(30_000));
    // A local rate limit: nothing reached the server.
    assert!(!s.may_have_been_processed);
    assert_eq!(
        s.advice(),
        "Try again in 30s; the request was not processed."
    );

    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    let s = ErrorSummary::of(&refused);
    assert_eq!(s.kind, "connect");
    assert!(s.retryable);
    assert!(!s.may_have_been_processed);

    let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
    let s = ErrorSummary::of(&reset);
    assert!(
        s.may_have_been_processed,
        "a reset after sending may have been processed"
    );

    let bad = sturdy::core::Error::new(
        sturdy::core::ErrorKind::Client(StatusCode::UNPROCESSABLE_ENTITY),
        "the API said no",
    );
    let s = ErrorSummary::of(&bad);
    assert_eq!(
        (s.kind, s.status, s.retryable),
        ("client_error", Some(422), false)
    );
    assert!(
        s.advice()
            .starts_with("Trying again unchanged will not help; "),
        "{}",
        s.advice()
    );
}

#[tokio::test(start_paused = true)]
async fn a_deadline_that_ends_while_attempt_1_waits_for_its_first_token_says_not_sent() {
    let ep = Endpoint::new(Answer::Stall);
    let api = Api::default();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(source(&ep)))
        .build(api.service());
    let mut req = post(API, "{}");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(200)));
    let start = tokio::time::Instant::now();
    let err = client.oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    assert!(
        err.to_string().contains(
            "the overall deadline of 200ms passed while attempt 1 waited for an access token, before it was sent"
        ),
        "{err}"
    );
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    assert!(!ErrorSummary::of(&*err).may_have_been_processed);
    assert!(api.seen().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failing_token_endpoint_in_a_client_stack_is_named_with_its_status() {
    let ep = Endpoint::new(status_json(401, r#"{"error":"invalid_client"}"#));
    let api = Api::default();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(source(&ep)))
        .build(api.service());
    let err = client.clone().oneshot(post(API, "{}")).await.unwrap_err();
    let s = ErrorSummary::of(&*err);
    assert_eq!(s.kind, "auth", "{s:?}");
    assert!(!s.retryable);
    assert!(!s.may_have_been_processed);
    assert!(
        s.message.contains("https://auth.example.com/oauth/token"),
        "{}",
        s.message
    );
    assert!(api.seen().is_empty());
    // The circuit breaker around auth does not count the token endpoint against the API host:
    // after many token failures the API answers as soon as the token endpoint does.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(client.clone().oneshot(get(API)).await.is_err());
    }
    ep.set_fallback(token_json("t-1", Some("3600")));
    tokio::time::sleep(Duration::from_secs(61)).await;
    let res = client.oneshot(get(API)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn token_caches_carry_over_between_tool_calls_of_one_session_client() {
    let ep = Endpoint::new(token_json("t-1", Some("3600")));
    let api = Api::default();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(source(&ep)))
        .build(api.service());
    for _ in 0..5 {
        let c = client.clone();
        tokio::spawn(async move { c.oneshot(get(API)).await.map(|r| r.status()) })
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(ep.count(), 1);
    assert_eq!(api.seen().len(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_session_client_can_be_the_token_client_and_gives_token_requests_retries() {
    let ep = Endpoint::new(token_json("t-1", Some("3600")));
    ep.then(status_json(503, "busy"));
    let token_client = ClientBuilder::new().build(ep.client());
    let src = sturdy::auth::ClientCredentials::new(
        token_client,
        crate::s43_util::TOKEN_URL,
        "my-client",
        "secret",
    )
    .unwrap();
    let t = src.get().await.unwrap();
    assert_eq!(sturdy::auth::ExposeSecret::expose_secret(t.secret()), "t-1");
    assert_eq!(
        ep.count(),
        2,
        "the token client's retry layer retried the 503"
    );
}

#[tokio::test(start_paused = true)]
async fn a_servers_wait_is_reported_capped_at_five_minutes() {
    let api = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(StatusCode::TOO_MANY_REQUESTS)
                .header("retry-after", "3600")
                .body(())
                .unwrap(),
        )
    });
    let client = tower::ServiceBuilder::new()
        .layer(sturdy::retry::RetryLayer::new())
        .service(api);
    let err = client.oneshot(get(API)).await.unwrap_err();
    let s = ErrorSummary::of(&*err);
    assert_eq!(sturdy::retry::MAX_REPORTED_WAIT, Duration::from_secs(300));
    assert_eq!(s.retry_after_ms, Some(300_000), "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn without_retries_a_probe_makes_one_attempt() {
    let api = Api::default();
    *api.always.lock().unwrap() = Some(503);
    let client = ClientBuilder::new().build(api.service());
    let mut req = get(API);
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let res = client.clone().oneshot(req).await;
    assert!(res.is_err() || res.unwrap().status() == StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.seen().len(), 1);
    // Without the option the same call is retried.
    let _ = client.oneshot(get(API)).await;
    assert!(api.seen().len() > 2);
}

#[tokio::test(start_paused = true)]
async fn under_a_retry_layer_with_hold_marks_the_deadline_words_are_the_same() {
    let ep = Endpoint::new(Answer::Stall);
    let api = Api::default();
    let svc = tower::ServiceBuilder::new()
        .layer(sturdy::retry::RetryLayer::new().with_hold_marks(true))
        .layer(AuthLayer::oauth2(source(&ep)))
        .service(api.service());
    let mut req = post(API, "{}");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(200)));
    let err = svc.oneshot(req).await.unwrap_err();
    assert!(
        err.to_string().contains(
            "the overall deadline of 200ms passed while attempt 1 waited for an access token, before it was sent"
        ),
        "{err}"
    );
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
}
