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
        let e = sturdy::auth::ClientCredentials::new(token_client(), &url, "id", "secret")
            .unwrap_err();
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
        sturdy::webhook::StandardWebhooks::with_secrets(["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", &bad])
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
