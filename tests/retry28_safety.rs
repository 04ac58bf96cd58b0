//! Which methods are retried, and the idempotency keys that make a POST safe to retry
//! (docs/guides/retry.md "When it is safe", docs/guides/idempotency.md "Client"): custom headers,
//! empty, huge, non-ASCII, unsendable and repeated keys, and the in-flight 409.
#![cfg(feature = "full")]

use std::time::Duration;

use http::HeaderName;
use sturdy::core::{BoxError, CallOptions, CallReport};
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tower::{Layer, ServiceBuilder, ServiceExt};

use crate::retry28_common::*;

const URL: &str = "http://api.example.com/orders";

async fn call(layer: RetryLayer, api: Api, r: Req) -> Result<Res, BoxError> {
    layer.with_seed(5).layer(api).oneshot(r).await
}

#[tokio::test(start_paused = true)]
async fn safe_methods_retry_others_do_not() {
    for m in ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"] {
        let (svc, seen) = api(|_, _| Ok(status(503)));
        call(RetryLayer::new(), svc, req(m, URL)).await.unwrap();
        assert_eq!(seen.len(), 4, "{m}");
    }
    for m in ["POST", "PATCH", "PURGE", "CONNECT", "LOCK"] {
        let (svc, seen) = api(|_, _| Ok(status(503)));
        let url = if m == "CONNECT" {
            "api.example.com:443"
        } else {
            URL
        };
        let res = call(RetryLayer::new(), svc, req(m, url)).await.unwrap();
        assert_eq!(res.status(), 503, "{m}");
        assert_eq!(seen.len(), 1, "{m}");
    }
    for m in ["POST", "PATCH", "PURGE"] {
        let (svc, seen) = api(|_, _| Ok(status(503)));
        let mut r = req(m, URL);
        r.headers_mut()
            .insert("idempotency-key", "k1".parse().unwrap());
        call(RetryLayer::new(), svc, r).await.unwrap();
        assert_eq!(seen.len(), 4, "{m} with a key");
    }
}

#[tokio::test(start_paused = true)]
async fn with_idempotency_header_moves_the_header_looked_at() {
    let layer = RetryLayer::new().with_idempotency_header(HeaderName::from_static("x-request-key"));
    assert_eq!(layer.idempotency_header(), "x-request-key");
    let (svc, seen) = api(|_, _| Ok(status(503)));
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("x-request-key", "abc".parse().unwrap());
    call(layer, svc, r).await.unwrap();
    assert_eq!(seen.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn client_builder_tells_retry_about_a_custom_key_header() {
    let (svc, seen) = api(|_, _| Ok(status(503)));
    let client = ClientBuilder::new()
        .with_idempotency(IdempotencyKeyLayer::new().with_header(HeaderName::from_static("x-idem")))
        .with_retry(RetryLayer::new().with_seed(1))
        .build(svc);
    let res = client.oneshot(post(URL, "{}")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(seen.len(), 4);
    let k = seen.get(0).headers["x-idem"].clone();
    assert!(seen.all().iter().all(|r| r.headers["x-idem"] == k));
    assert!(!seen.get(0).headers.contains_key("idempotency-key"));
}

#[tokio::test(start_paused = true)]
async fn an_empty_key_header_does_not_make_a_post_safe() {
    // An empty Idempotency-Key names no request: a server (sturdy's own answers 400) cannot
    // deduplicate it, so it must not license a replay of a POST.
    let (svc, seen) = api(|_, _| Ok(status(503)));
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "".parse().unwrap());
    call(RetryLayer::new(), svc, r).await.unwrap();
    assert_eq!(seen.len(), 1, "a POST with an empty key was retried");
}

#[tokio::test(start_paused = true)]
async fn an_empty_key_is_never_reported_as_a_key_to_retry_with() {
    // Through the client: the caller's empty header is kept; if the call fails, the error must
    // not tell the caller to "retry with the same idempotency key " followed by nothing.
    let (svc, seen) = api(|_, _| Err(reset()));
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(1))
        .build(svc);
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "".parse().unwrap());
    let err = client.oneshot(r).await.unwrap_err();
    let text = err.to_string();
    assert!(seen.len() >= 1);
    assert!(!text.trim_end().ends_with("idempotency key"), "{text}");
    assert_ne!(top(&err).idempotency_key(), Some(""), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_user_key_is_kept_even_10kb_long() {
    let key = "k".repeat(10 * 1024);
    let (svc, seen) = api(|_, _| Err(reset()));
    let client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new().with_seed(3))
        .service(svc);
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", key.parse().unwrap());
    let err = client.oneshot(r).await.unwrap_err();
    assert_eq!(seen.len(), 4);
    assert!(seen
        .all()
        .iter()
        .all(|r| r.headers["idempotency-key"] == key.as_str()));
    assert_eq!(top(&err).idempotency_key(), Some(key.as_str()));
}

#[tokio::test(start_paused = true)]
async fn repeated_key_headers_are_kept_as_sent() {
    let (svc, seen) = api(|_, _| Ok(status(201)));
    let client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .service(svc);
    let mut r = post(URL, "{}");
    r.headers_mut()
        .append("idempotency-key", "a".parse().unwrap());
    r.headers_mut()
        .append("idempotency-key", "b".parse().unwrap());
    client.oneshot(r).await.unwrap();
    let got: Vec<_> = seen
        .get(0)
        .headers
        .get_all("idempotency-key")
        .iter()
        .cloned()
        .collect();
    assert_eq!(
        got,
        ["a", "b"],
        "a key the caller set must be kept, not replaced"
    );
}

#[tokio::test(start_paused = true)]
async fn call_options_keys_that_no_header_can_carry_are_hashed() {
    // The SHA-256 of each key, computed outside the project.
    let cases = [
        (
            "a\r\nb",
            "18745f36a05e29072709042d6062ce54f1b08ff36c27ba80c39f81fb010c8ce2",
        ),
        (
            " k",
            "5e7744b1902dc6d050e2cf877f26b9efcb4918a599d7bf6f8aa305755b65de05",
        ),
        (
            "k\t",
            "c4ddc3b8cafe254638e62b203b853bdc15f86a1455a35012fbb6306dc21205e9",
        ),
    ];
    for (key, digest) in cases {
        let (svc, seen) = api(|_, _| Err(reset()));
        let client = ServiceBuilder::new()
            .layer(IdempotencyKeyLayer::new())
            .layer(RetryLayer::new().with_seed(3))
            .service(svc);
        let mut r = post(URL, "{}");
        r.extensions_mut()
            .insert(CallOptions::new().with_idempotency_key(key));
        let err = client.clone().oneshot(r).await.unwrap_err();
        let sent = seen.get(0).headers["idempotency-key"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(sent, format!("sturdy-sha256-{digest}"), "{key:?}");
        // Same every time.
        let mut r = post(URL, "{}");
        r.extensions_mut()
            .insert(CallOptions::new().with_idempotency_key(key));
        let _ = client.oneshot(r).await;
        assert_eq!(seen.get(4).headers["idempotency-key"], sent.as_str());
        // The key a failed call reports is the value sent.
        assert_eq!(top(&err).idempotency_key(), Some(sent.as_str()));
        assert!(err.to_string().contains(&sent));
    }
}

#[tokio::test(start_paused = true)]
async fn call_options_key_is_sent_with_any_method_and_non_ascii_as_utf8() {
    let (svc, seen) = api(|_, _| Ok(status(200)));
    let client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .service(svc);
    let mut r = get(URL);
    r.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("get-key-1"));
    client.clone().oneshot(r).await.unwrap();
    assert_eq!(seen.get(0).headers["idempotency-key"], "get-key-1");

    let mut r = req("PUT", URL);
    r.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("café"));
    client.clone().oneshot(r).await.unwrap();
    assert_eq!(
        seen.get(1).headers["idempotency-key"].as_bytes(),
        "café".as_bytes()
    );

    // A GET without CallOptions gets no key.
    client.oneshot(get(URL)).await.unwrap();
    assert!(!seen.get(2).headers.contains_key("idempotency-key"));
}

#[tokio::test(start_paused = true)]
async fn two_identical_orders_get_two_keys() {
    let (svc, seen) = api(|_, _| Ok(status(201)));
    let client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .service(svc);
    client.clone().oneshot(post(URL, "same")).await.unwrap();
    client.oneshot(post(URL, "same")).await.unwrap();
    assert_ne!(
        seen.get(0).headers["idempotency-key"],
        seen.get(1).headers["idempotency-key"]
    );
}

fn in_flight(ra: Option<&str>) -> Res {
    let mut b = http::Response::builder()
        .status(409)
        .header("content-type", "application/problem+json");
    if let Some(ra) = ra {
        b = b.header("retry-after", ra);
    }
    b.body(http_body_util::Full::from("{}")).unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_in_flight_409_is_waited_out_for_a_keyed_request() {
    let (svc, seen) = api(|n, _| {
        Ok(if n < 2 {
            in_flight(Some("1"))
        } else {
            status(201)
        })
    });
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "k409".parse().unwrap());
    let res = call(RetryLayer::new(), svc, r).await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(seen.len(), 3);
    assert!(seen.gap(0) >= Duration::from_secs(1) && seen.gap(0) <= Duration::from_millis(1200));
}

#[tokio::test(start_paused = true)]
async fn other_409s_are_returned_as_they_are() {
    // No Retry-After.
    let (svc, seen) = api(|_, _| Ok(in_flight(None)));
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "k".parse().unwrap());
    assert_eq!(call(RetryLayer::new(), svc, r).await.unwrap().status(), 409);
    assert_eq!(seen.len(), 1);
    // No key (a GET).
    let (svc, seen) = api(|_, _| Ok(in_flight(Some("1"))));
    assert_eq!(
        call(RetryLayer::new(), svc, get(URL))
            .await
            .unwrap()
            .status(),
        409
    );
    assert_eq!(seen.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_in_flight_409_asking_too_long_is_returned_with_a_report() {
    let (svc, seen) = api(|_, _| Ok(in_flight(Some("600"))));
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "k-long".parse().unwrap());
    let res = call(RetryLayer::new(), svc, r).await.unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(seen.len(), 1);
    let report = res
        .extensions()
        .get::<CallReport>()
        .expect("a CallReport in the extensions");
    assert_eq!(report.idempotency_key(), Some("k-long"));
    assert_eq!(report.attempts(), 1);

    // And on the last attempt.
    let (svc, seen) = api(|_, _| Ok(in_flight(Some("1"))));
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "k-last".parse().unwrap());
    let res = call(RetryLayer::new().with_max_attempts(2), svc, r)
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(seen.len(), 2);
    let report = res
        .extensions()
        .get::<CallReport>()
        .expect("a CallReport in the extensions");
    assert_eq!(report.attempts(), 2);
}

#[tokio::test(start_paused = true)]
async fn permanent_statuses_are_not_retried() {
    for code in [400, 401, 403, 404, 409, 422, 501, 505] {
        let (svc, seen) = api(move |_, _| Ok(status(code)));
        let res = call(RetryLayer::new(), svc, get(URL)).await.unwrap();
        assert_eq!(res.status(), code);
        assert_eq!(seen.len(), 1, "{code}");
    }
    for code in [408, 425, 429, 500, 502, 503, 504] {
        let (svc, seen) = api(move |_, _| Ok(status(code)));
        call(RetryLayer::new(), svc, get(URL)).await.unwrap();
        assert_eq!(seen.len(), 4, "{code}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_key_reported_is_the_key_sent_when_header_and_options_differ() {
    let (svc, seen) = api(|_, _| Err(reset()));
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(2))
        .build(svc);
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "from-header".parse().unwrap());
    r.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("from-options"));
    let err = client.oneshot(r).await.unwrap_err();
    let sent: Vec<_> = seen
        .get(0)
        .headers
        .get_all("idempotency-key")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(sent.len(), 1, "two keys sent: {sent:?}");
    assert_eq!(top(&err).idempotency_key(), Some(sent[0].as_str()));
    assert!(err.to_string().ends_with(&sent[0]), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_key_in_options_that_was_never_sent_is_not_reported() {
    // Without the key layer nothing puts the key of CallOptions on the wire.
    let (svc, seen) = api(|_, _| Err(reset()));
    let mut r = post(URL, "{}");
    r.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("never-sent"));
    let err = RetryLayer::new().layer(svc).oneshot(r).await.unwrap_err();
    assert!(!seen.get(0).headers.contains_key("idempotency-key"));
    assert_eq!(seen.len(), 1);
    let text = err.to_string();
    assert!(!text.contains("never-sent"), "{text}");
    assert_ne!(top(&err).idempotency_key(), Some("never-sent"));
}

#[tokio::test(start_paused = true)]
async fn an_options_key_in_a_custom_header_is_retried_and_reported() {
    let (svc, seen) = api(|_, _| Err(reset()));
    let client = ClientBuilder::new()
        .with_idempotency(IdempotencyKeyLayer::new().with_header(HeaderName::from_static("x-idem")))
        .with_retry(RetryLayer::new().with_seed(1))
        .build(svc);
    let mut r = post(URL, "{}");
    r.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("opt-7"));
    let err = client.oneshot(r).await.unwrap_err();
    assert_eq!(seen.len(), 4);
    assert!(seen.all().iter().all(|r| r.headers["x-idem"] == "opt-7"));
    assert_eq!(top(&err).idempotency_key(), Some("opt-7"));
}
