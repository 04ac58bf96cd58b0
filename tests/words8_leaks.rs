//! Error messages of constructors that take secrets or URLs that may carry them, read for
//! leaks: "no `Debug` or log line shows them" (auth.md), "No `Debug` output or log line shows a
//! secret" (webhooks.md), and messages that "name the token URL without its user info or query".
//! A constructor refusing a value must not repeat the secret in its error.
#![cfg(feature = "full")]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::core::BoxError;
use tower::service_fn;

const PW: &str = "hunter2pw";
const KEY: &str = "SECRETKEY9";

fn clean(what: &str, shown: &str) {
    assert!(!shown.contains(PW), "{what}: {shown}");
    assert!(!shown.contains(KEY), "{what}: {shown}");
}

fn token_client() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send + 'static,
> + Clone
       + Send
       + 'static {
    service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    })
}

/// `ClientCredentials::new` refuses a token URL that is not a valid absolute URI; its error must
/// not repeat the URL's userinfo or query (a `client_secret` put there by mistake).
#[test]
fn an_invalid_token_url_is_refused_without_repeating_its_secrets() {
    for url in [
        format!("https://id:{PW}@auth.example.com/oauth/token?client_secret={KEY} x"),
        format!("id:{PW}@auth.example.com/oauth/token?client_secret={KEY}"),
        format!("/oauth/token?client_secret={KEY}"),
    ] {
        let e =
            sturdy::auth::ClientCredentials::new(token_client(), &url, "id", "secret").unwrap_err();
        clean(&url, &e.to_string());
        clean(&url, &format!("{e:?}"));
    }
}

/// `StandardWebhooks::new` refuses a secret that is not base64; its error must not repeat the
/// secret (webhooks.md: "No `Debug` output or log line shows a secret").
#[test]
fn a_malformed_standard_webhooks_secret_is_refused_without_repeating_it() {
    let bad = format!("whsec_{KEY}!!{PW}");
    let errors = [
        sturdy::webhook::StandardWebhooks::new(&bad).unwrap_err(),
        sturdy::webhook::StandardWebhooks::with_secrets([
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            &bad,
        ])
        .unwrap_err(),
        sturdy::webhook::decode_standard_secret(&bad).unwrap_err(),
        sturdy::webhook::sign_standard(&bad, "msg_1", 1, b"{}").unwrap_err(),
    ];
    for e in errors {
        clean("secret", &e.to_string());
        clean("secret", &format!("{e:?}"));
    }
}

/// A Redis URL may carry a password (`redis://:password@host/`). Connecting to one that cannot
/// be reached, or giving a malformed one, must not repeat the password in the error.
#[tokio::test]
async fn redis_connect_errors_do_not_repeat_the_urls_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let urls = [
        format!("redis://user:{PW}@127.0.0.1:{port}/"),
        format!("redis://:{PW}@127.0.0.1:{port}/0"),
        format!("redis//:{PW}@127.0.0.1:{port}/"),
        format!("rediss://:{PW}@127.0.0.1:{port}/?x={KEY}"),
    ];
    let quota = sturdy::ratelimit::Quota::per_second(1).unwrap();
    for url in &urls {
        let mut shown = Vec::new();
        let run = async {
            if let Err(e) = sturdy::redis::RedisQuota::connect(url, quota).await {
                shown.push(format!("{e} {e:?}"));
            }
            if let Err(e) = sturdy::redis::RedisIdempotencyStore::connect(url).await {
                shown.push(format!("{e} {e:?}"));
            }
            if let Err(e) = sturdy::redis::RedisStreamQueue::connect(url, "s").await {
                shown.push(format!("{e} {e:?}"));
            }
            if let Err(e) = sturdy::redis::RedisStreamConsumer::connect(
                url,
                "s",
                "g",
                "w",
                Duration::from_secs(60),
            )
            .await
            {
                shown.push(format!("{e} {e:?}"));
            }
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("connects end");
        assert!(!shown.is_empty(), "{url}: every connect failed to fail?");
        for s in shown {
            clean(url, &s);
        }
    }
}

/// `Paginate::new` refuses a first-page URI that is not absolute or not valid; its error must
/// not repeat the URI's userinfo or query.
#[test]
fn an_invalid_first_page_uri_is_refused_without_repeating_its_secrets() {
    for uri in [
        format!("user:{PW}@api.example.com/orders?api_key={KEY}"),
        format!("/orders?api_key={KEY}"),
        format!("http://user:{PW}@api.example.com/orders?api_key={KEY} x"),
    ] {
        let e = sturdy::paginate::Paginate::new(
            token_client(),
            &uri,
            sturdy::paginate::JsonCursor::new("/data", "/next"),
        )
        .unwrap_err();
        clean(&uri, &e.to_string());
        clean(&uri, &format!("{e:?}"));
    }
}

/// `Rejection::reason`: "What was wrong, for the logs. It never contains a secret." Nor the
/// MAC the verifier expected, which would let whoever reads the logs forge that delivery.
#[test]
fn rejection_reasons_never_hold_the_secret_or_the_expected_mac() {
    use std::time::UNIX_EPOCH;
    use sturdy::webhook::{
        sign_github, sign_standard, sign_stripe, GenericHmac, GitHub, StandardWebhooks, Stripe,
        Verifier,
    };
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let raw = "It's a Secret to Everybody";
    let body = br#"{"id":"evt_1","test": 2432232314}"#;
    let ts: i64 = 1_700_000_000;
    let now = UNIX_EPOCH + std::time::Duration::from_secs(ts as u64);
    let hm = |pairs: &[(&str, String)]| {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    };
    let check = |what: &str,
                 r: Result<sturdy::webhook::Verified, sturdy::webhook::Rejection>,
                 expected: &str| {
        let rej = r.expect_err(what);
        let shown = format!("{} {rej:?}", rej.reason);
        assert!(!shown.contains(raw), "{what}: {shown}");
        assert!(
            !shown.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            "{what}: {shown}"
        );
        assert!(
            !shown.contains(expected),
            "{what}: the expected MAC: {shown}"
        );
    };

    // GitHub: a wrong signature over the body.
    let good = sign_github(raw, body);
    let good_hex = good.trim_start_matches("sha256=").to_owned();
    let bad = format!("sha256={}", "0".repeat(64));
    check(
        "github",
        GitHub::new(raw)
            .unwrap()
            .verify(&hm(&[("x-hub-signature-256", bad)]), body, now),
        &good_hex,
    );

    // Stripe.
    let good = sign_stripe(raw, ts, body);
    let good_hex = good.split("v1=").nth(1).unwrap().to_owned();
    let bad = format!("t={ts},v1={}", "0".repeat(64));
    check(
        "stripe",
        Stripe::new(raw)
            .unwrap()
            .verify(&hm(&[("stripe-signature", bad)]), body, now),
        &good_hex,
    );

    // Standard Webhooks.
    let good = sign_standard(secret, "msg_1", ts, body).unwrap();
    let good_b64 = good.trim_start_matches("v1,").to_owned();
    let bad = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=".to_owned();
    check(
        "standard",
        StandardWebhooks::new(secret).unwrap().verify(
            &hm(&[
                ("webhook-id", "msg_1".to_owned()),
                ("webhook-timestamp", ts.to_string()),
                ("webhook-signature", bad),
            ]),
            body,
            now,
        ),
        &good_b64,
    );

    // A generic scheme, hex over the body.
    let g = GenericHmac::new("acme", http::HeaderName::from_static("x-acme-sig"), raw).unwrap();
    let good_hex = sign_github(raw, body)
        .trim_start_matches("sha256=")
        .to_owned();
    check(
        "generic",
        g.verify(&hm(&[("x-acme-sig", "0".repeat(64))]), body, now),
        &good_hex,
    );
}

/// The composed client's errors for a URI that carries userinfo and a query API key: refused,
/// retries exhausted on 503, a long `Retry-After`, and the circuit breaker's refusal. Neither
/// `Display` nor `Debug` of the error repeats them.
#[tokio::test]
async fn the_composed_clients_errors_do_not_repeat_the_uris_secrets() {
    use sturdy::retry::{Backoff, RetryLayer};
    use tower::ServiceExt;
    let quick = || {
        RetryLayer::new().with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(1), Duration::from_millis(2))
                .unwrap(),
        )
    };
    let get = |port: u16| {
        Request::get(format!(
            "http://user:{PW}@127.0.0.1:{port}/orders?api_key={KEY}"
        ))
        .body(Full::<Bytes>::default())
        .unwrap()
    };
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    // Refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = sturdy::ClientBuilder::new()
        .with_retry(quick())
        .build(http.clone());
    let e = client.clone().oneshot(get(port)).await.unwrap_err();
    clean("refused", &format!("{e} {e:?}"));

    // 503 then a long Retry-After, from a real server.
    let app = axum::Router::new()
        .route(
            "/orders",
            axum::routing::get(|| async { (http::StatusCode::SERVICE_UNAVAILABLE, "down") }),
        )
        .route(
            "/slow",
            axum::routing::get(|| async {
                (
                    http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "3600")],
                    "later",
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let res = client.clone().oneshot(get(port)).await;
    assert_eq!(
        res.unwrap().status(),
        503,
        "the last 503 is returned as it is"
    );
    let slow = Request::get(format!(
        "http://user:{PW}@127.0.0.1:{port}/slow?api_key={KEY}"
    ))
    .body(Full::<Bytes>::default())
    .unwrap();
    let e = client.clone().oneshot(slow).await.unwrap_err();
    clean("429", &format!("{e} {e:?}"));
    // Enough failures for the breaker to open, then its refusal.
    let mut refused = 0;
    for _ in 0..40 {
        if let Err(e) = client.clone().oneshot(get(port)).await {
            clean("breaker", &format!("{e} {e:?}"));
            refused += 1;
        }
    }
    assert!(refused > 0, "the breaker opened");
}

/// `Debug` of a pager whose first page URI carries userinfo and a query API key: the crate
/// keeps userinfo and queries out of its messages ("never the userinfo, which may hold a
/// password"), but its `Debug` output, which ends up in logs, shows both.
#[test]
fn a_pagers_debug_does_not_show_the_uris_secrets() {
    let uri = format!("http://user:{PW}@api.example.com/orders?api_key={KEY}");
    let builder = sturdy::paginate::Paginate::builder(
        token_client(),
        &uri,
        sturdy::paginate::JsonCursor::new("/data", "/next"),
    );
    let b = format!("{builder:?}");
    let pager = builder.build().unwrap();
    let p = format!("{pager:?}");
    clean("builder", &b);
    clean("pager", &p);
}

/// An API that answers 200, with a `Debug` of its own.
#[derive(Clone, Debug)]
struct Echo;

impl tower::Service<Request<Full<Bytes>>> for Echo {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Self::Response, BoxError>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::default())))
    }
}

/// auth.md: "no `Debug` or log line shows them": the services the static layers make, and the
/// composed client holding them.
#[test]
fn services_and_clients_holding_static_credentials_show_no_secret_in_debug() {
    use tower::Layer;
    let layers = [
        sturdy::auth::AuthLayer::bearer(KEY).unwrap(),
        sturdy::auth::AuthLayer::api_key(http::HeaderName::from_static("x-api-key"), KEY).unwrap(),
        sturdy::auth::AuthLayer::api_key_query("api_key", KEY).unwrap(),
        sturdy::auth::AuthLayer::basic("user", PW).unwrap(),
    ];
    for layer in layers {
        let svc = layer.layer(Echo);
        let shown = format!("{svc:?}");
        clean("Auth", &shown);
        // Basic's header holds base64 of `user:password`.
        assert!(!shown.contains("dXNlcjpodW50ZXIycHc"), "{shown}");
        assert!(!shown.contains("U0VDUkVUS0VZOQ"), "{shown}");
        let client = sturdy::ClientBuilder::new().with_auth(layer).build(Echo);
        let shown = format!("{client:?}");
        clean("Client", &shown);
        assert!(!shown.contains("dXNlcjpodW50ZXIycHc"), "{shown}");
    }
}
