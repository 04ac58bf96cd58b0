//! Outside tests of the client idempotency-key layer with retries after timeouts and 503s,
//! against docs/guides/idempotency.md ("every retry carries the same key"), docs/guides/retry.md
//! ("When it is safe") and the rustdoc of `IdempotencyKeyLayer` and `ClientBuilder`. Paused time,
//! in-process services.
#![cfg(feature = "full")]

use crate::outsider4_common;
use http::header::HeaderName;
use outsider4_common::*;
use sturdy::core::classify::delivery;
use sturdy::core::{CallOptions, Delivery};
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tower::{ServiceBuilder, ServiceExt};

const URL: &str = "http://api.example.com/orders";

/// Attempt n: hangs (cut by the 1 s attempt timeout), then 503, then 201.
fn timeout_then_503_then_created() -> Api {
    Api::new(|n, _| match n {
        0 => Act::Hang,
        1 => st(503),
        _ => st(201),
    })
}

fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b[14] == b'4'
        && s.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

/// The keys the API saw in `header`, one per attempt.
fn keys(api: &Api, header: &str) -> Vec<Option<String>> {
    api.seen()
        .iter()
        .map(|s| {
            s.headers
                .get(header)
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect()
}

fn assert_one_key(keys: &[Option<String>], attempts: usize) -> String {
    assert_eq!(keys.len(), attempts, "{keys:?}");
    let first = keys[0].clone().expect("the first attempt carries a key");
    for k in keys {
        assert_eq!(k.as_deref(), Some(first.as_str()), "{keys:?}");
    }
    first
}

/// The default client: a POST whose first attempt times out and whose second gets 503 is
/// retried with one UUID v4 key on all three attempts.
#[tokio::test(start_paused = true)]
async fn post_retried_after_timeout_and_503_keeps_one_key() {
    let api = timeout_then_503_then_created();
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(21))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let res = bounded(client.oneshot(post(URL))).await.unwrap();
    assert_eq!(res.status(), 201);
    let key = assert_one_key(&keys(&api, "idempotency-key"), 3);
    assert!(is_uuid_v4(&key), "{key}");
}

/// PATCH is keyed the same way; two identical POSTs get two keys ("two deliberate identical
/// orders are two orders").
#[tokio::test(start_paused = true)]
async fn patch_is_keyed_and_identical_posts_get_two_keys() {
    let api = timeout_then_503_then_created();
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(21))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let req = http::Request::patch(URL).body(Body::from("{}")).unwrap();
    assert_eq!(
        bounded(client.clone().oneshot(req)).await.unwrap().status(),
        201
    );
    assert_one_key(&keys(&api, "idempotency-key"), 3);

    let api = Api::always(st(201));
    let client = ClientBuilder::new().build(api.service());
    bounded(client.clone().oneshot(post(URL))).await.unwrap();
    bounded(client.oneshot(post(URL))).await.unwrap();
    let k = keys(&api, "idempotency-key");
    assert_ne!(k[0], k[1]);
}

/// `IdempotencyKeyLayer::with_header` in `ClientBuilder`: "the retry layer is told the header",
/// so the POST is retried after a timeout and a 503 with one key in that header (and none in
/// `Idempotency-Key`), whichever order the builder's setters are called in.
#[tokio::test(start_paused = true)]
async fn custom_header_in_client_builder() {
    let header = HeaderName::from_static("x-request-key");
    for order in 0..2 {
        let api = timeout_then_503_then_created();
        let keys_layer = IdempotencyKeyLayer::new().with_header(header.clone());
        let retry = RetryLayer::new().with_seed(21);
        let res = if order == 0 {
            let client = ClientBuilder::new()
                .with_idempotency(keys_layer)
                .with_retry(retry)
                .with_attempt_timeout(secs(1))
                .build(api.service());
            bounded(client.oneshot(post(URL))).await
        } else {
            let client = ClientBuilder::new()
                .with_retry(retry)
                .with_attempt_timeout(secs(1))
                .with_idempotency(keys_layer)
                .build(api.service());
            bounded(client.oneshot(post(URL))).await
        };
        assert_eq!(res.unwrap().status(), 201, "order {order}");
        let key = assert_one_key(&keys(&api, "x-request-key"), 3);
        assert!(is_uuid_v4(&key));
        assert!(
            keys(&api, "idempotency-key").iter().all(Option::is_none),
            "order {order}"
        );
    }
}

/// A key given per request (`CallOptions::with_idempotency_key`) goes in the custom header on
/// every attempt; when the call still fails, the error carries it and says to retry with it.
#[tokio::test(start_paused = true)]
async fn request_key_in_custom_header_and_in_the_final_error() {
    let api = Api::new(|n, _| if n == 1 { st(503) } else { Act::Hang });
    let client = ClientBuilder::new()
        .with_idempotency(
            IdempotencyKeyLayer::new().with_header(HeaderName::from_static("x-request-key")),
        )
        .with_retry(RetryLayer::new().with_seed(2))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let mut req = post(URL);
    req.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("order-7421"));
    let err = bounded(client.oneshot(req)).await.unwrap_err();
    let k = keys(&api, "x-request-key");
    assert_eq!(assert_one_key(&k, 4), "order-7421");
    let e = sturdy_error(&err);
    assert_eq!(e.report().unwrap().attempts(), 4, "{err}");
    assert_eq!(e.report().unwrap().idempotency_key(), Some("order-7421"));
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let msg = err.to_string();
    assert!(msg.contains("gave up after 4 attempts"), "{msg}");
    assert!(
        msg.contains("retry with the same idempotency key order-7421"),
        "{msg}"
    );
}

/// A key the caller put in the header is kept on every attempt.
#[tokio::test(start_paused = true)]
async fn callers_own_header_key_is_kept() {
    let api = timeout_then_503_then_created();
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(21))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let mut req = post(URL);
    req.headers_mut()
        .insert("idempotency-key", "mine-1".parse().unwrap());
    assert_eq!(bounded(client.oneshot(req)).await.unwrap().status(), 201);
    assert_eq!(assert_one_key(&keys(&api, "idempotency-key"), 3), "mine-1");
}

/// The layers alone in a `ServiceBuilder`: with a custom header the retry layer must be told it
/// (`RetryLayer::with_idempotency_header`); then the POST is retried after a timeout and a 503
/// with one key. Not told, the POST is not retried.
#[tokio::test(start_paused = true)]
async fn layers_alone_with_a_custom_header() {
    let header = HeaderName::from_static("x-idem");
    let api = timeout_then_503_then_created();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new().with_header(header.clone()))
        .layer(
            RetryLayer::new()
                .with_seed(21)
                .with_idempotency_header(header.clone())
                .with_attempt_timeout(secs(1)),
        )
        .service(api.service());
    assert_eq!(bounded(svc.oneshot(post(URL))).await.unwrap().status(), 201);
    assert_one_key(&keys(&api, "x-idem"), 3);

    let api = timeout_then_503_then_created();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new().with_header(header))
        .layer(
            RetryLayer::new()
                .with_seed(21)
                .with_attempt_timeout(secs(1)),
        )
        .service(api.service());
    let err = bounded(svc.oneshot(post(URL))).await.unwrap_err();
    assert_eq!(api.calls(), 1, "not told the header: not retried ({err})");
}

/// The default header with the layers alone, `AttemptTimeoutLayer` under the retry layer: the
/// same key on every attempt.
#[tokio::test(start_paused = true)]
async fn layers_alone_with_attempt_timeout_layer() {
    let api = timeout_then_503_then_created();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new().with_seed(21))
        .layer(sturdy::retry::AttemptTimeoutLayer::new(Some(secs(1))))
        .service(api.service());
    assert_eq!(bounded(svc.oneshot(post(URL))).await.unwrap().status(), 201);
    assert_one_key(&keys(&api, "idempotency-key"), 3);
}

/// retry.md: "A 409 that answers a request with an `Idempotency-Key` *and* carries
/// `Retry-After` ... is retried after the `Retry-After`". With the key in a custom header (the
/// builder tells the retry layer the header), the same holds.
#[tokio::test(start_paused = true)]
async fn in_flight_409_with_a_custom_header_is_retried() {
    let api = Api::new(|n, _| {
        if n == 0 {
            st_h(409, &[("retry-after", "1")])
        } else {
            st(201)
        }
    });
    let client = ClientBuilder::new()
        .with_idempotency(
            IdempotencyKeyLayer::new().with_header(HeaderName::from_static("x-request-key")),
        )
        .with_retry(RetryLayer::new().with_seed(4))
        .build(api.service());
    let res = bounded(client.oneshot(post(URL))).await.unwrap();
    assert_eq!(res.status(), 201);
    assert_one_key(&keys(&api, "x-request-key"), 2);
}

// ------------------------------------------------------------------ the key in the final error

/// retry.md: a final error's `report()` gives "the idempotency key", and for a POST the message
/// says "it may have been processed: retry with the same idempotency key <key>". Whatever ended
/// the call: the attempts ran out, the only attempt timed out, retries were off for the
/// request, a failure that is never retried, the deadline.
#[tokio::test(start_paused = true)]
async fn the_final_error_carries_the_key_sent_whatever_ended_the_call() {
    type Case = (
        &'static str,
        fn(usize) -> Act,
        RetryLayer,
        Option<CallOptions>,
    );
    let body_error = |_: usize| Act::Io(std::io::ErrorKind::InvalidData);
    let cases: Vec<Case> = vec![
        (
            "attempts ran out (resets)",
            |_| Act::Io(std::io::ErrorKind::ConnectionReset),
            RetryLayer::new().with_seed(1),
            None,
        ),
        (
            "one attempt, timed out",
            |_| Act::Hang,
            RetryLayer::new().with_max_attempts(1),
            None,
        ),
        (
            "retries off for the request",
            |_| Act::Hang,
            RetryLayer::new(),
            Some(CallOptions::new().without_retries()),
        ),
        (
            "a failure never retried",
            body_error,
            RetryLayer::new().with_seed(1),
            None,
        ),
        (
            "the deadline",
            |_| Act::Hang,
            RetryLayer::new().with_seed(1),
            Some(CallOptions::new().with_deadline(ms(1_500))),
        ),
    ];
    for header in ["idempotency-key", "x-request-key"] {
        for (name, script, retry, opts) in cases.iter().cloned() {
            let api = Api::new(move |n, _| script(n));
            let client = ClientBuilder::new()
                .with_idempotency(
                    IdempotencyKeyLayer::new().with_header(HeaderName::from_static(header)),
                )
                .with_retry(retry)
                .with_attempt_timeout(secs(1))
                .build(api.service());
            let mut req = post(URL);
            if let Some(o) = opts {
                req.extensions_mut().insert(o);
            }
            let err = bounded(client.oneshot(req)).await.unwrap_err();
            let sent = keys(&api, header);
            let key = assert_one_key(&sent, api.calls());
            let e = sturdy_error(&err);
            let report = e
                .report()
                .unwrap_or_else(|| panic!("{header} {name}: no report: {err}"));
            assert_eq!(
                report.idempotency_key(),
                Some(key.as_str()),
                "{header} {name}: {err}"
            );
            assert_eq!(
                delivery(&*err),
                Delivery::MaybeProcessed,
                "{header} {name}: {err}"
            );
            assert!(
                err.to_string()
                    .contains(&format!("retry with the same idempotency key {key}")),
                "{header} {name}: {err}"
            );
        }
    }
}
