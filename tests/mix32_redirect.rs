//! docs/guides/reqwest.md and the sturdy-reqwest rustdoc on redirects: 301/302/303/307/308 with
//! buffered and streamed bodies, through `SturdyMiddleware` and `ReqwestService`; the
//! idempotency key and auth headers on redirected requests, redirects to another origin, each
//! stack attempt as one reqwest `execute` with its redirects, and too many redirects. A
//! scripted hyper server on 127.0.0.1:0, real time with millisecond settings.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::error::Error as StdError;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::HeaderName;
use http_body_util::{BodyExt, Full, StreamBody};
use sturdy::auth::AuthLayer;
use sturdy::core::{CallOptions, Delivery, ErrorKind};
use sturdy::reqwest::{delivery, find, ReqwestService, SturdyMiddleware};
use sturdy::ClientBuilder;
use tower::ServiceExt;

use crate::mix32_util::*;

type BoxError = Box<dyn StdError + Send + Sync>;

fn mw() -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .build()
}

fn mw_auth(auth: AuthLayer) -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_auth(auth)
                .build(next)
        }))
        .build()
}

fn stream_body(data: &'static [u8]) -> reqwest::Body {
    let chunks: Vec<Result<http_body::Frame<Bytes>, Infallible>> = data
        .chunks(3)
        .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c))))
        .collect();
    reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(chunks)))
}

/// A server whose `/start` answers `status` with `Location: location`, and whose `/final`
/// answers 201 with the method it saw.
async fn redirecting(status: u16, location: &'static str) -> Scripted {
    scripted(move |hit, _| async move {
        if hit.path == "/start" {
            respond(status, &[("location", location)], "")
        } else {
            respond(201, &[], hit.method.clone())
        }
    })
    .await
}

fn key_of(h: &Hit) -> String {
    h.header("idempotency-key").unwrap_or_default()
}

/// reqwest.md: "A body reqwest holds as bytes (`.body(bytes or a string)`, `.json()`) is
/// passed on as it is", so reqwest can replay it on a 307 or 308; the stack's one attempt
/// carries one idempotency key, on the redirected request too.
#[tokio::test]
async fn mix32_mw_307_308_replay_a_bytes_body_with_the_same_key_and_auth() {
    for status in [307u16, 308] {
        let s = redirecting(status, "/final").await;
        let body = format!("order-{status}");
        let res = within(
            10,
            mw().post(s.url("/start"))
                .bearer_auth("tok-same-origin")
                .header("content-type", "text/plain")
                .body(body.clone())
                .send(),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 201, "{status}");
        assert_eq!(res.url().path(), "/final", "url() is the URL it came from");
        let hits = s.hits();
        assert_eq!(hits.len(), 2, "{status}: one redirect, no retry");
        for h in &hits {
            assert_eq!(h.method, "POST");
            assert_eq!(
                h.body,
                body.as_bytes(),
                "{status}: body replayed on {}",
                h.path
            );
            assert_eq!(
                h.header("authorization").as_deref(),
                Some("Bearer tok-same-origin")
            );
        }
        let k = key_of(&hits[0]);
        assert!(!k.is_empty(), "ClientBuilder sets a key on a POST");
        assert_eq!(key_of(&hits[1]), k, "the redirected request keeps the key");
    }
}

/// reqwest.md: "A streaming body (`reqwest::Body::wrap`, multipart) is read into memory
/// first": once in memory it is bytes, so a 307 replays it like any other.
#[tokio::test]
async fn mix32_mw_streamed_body_is_buffered_so_a_307_replays_it() {
    let s = redirecting(307, "/final").await;
    let res = within(
        10,
        mw().post(s.url("/start"))
            .body(stream_body(b"streamed-order-body"))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    let hits = s.hits();
    assert_eq!(hits.len(), 2);
    assert_eq!(&hits[1].body[..], b"streamed-order-body");
    assert_eq!(key_of(&hits[0]), key_of(&hits[1]));
}

/// A body above the retry layer's replay limit (1 MiB) is sent once by the retry layer, but
/// reqwest still holds it as bytes: a 307 within the attempt replays all of it.
#[tokio::test]
async fn mix32_mw_307_replays_a_body_above_the_retry_replay_limit() {
    let s = redirecting(307, "/final").await;
    let big = vec![b'z'; 2 * 1024 * 1024 + 7];
    let res = within(30, mw().post(s.url("/start")).body(big.clone()).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let hits = s.hits();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[1].body.len(), big.len());
}

/// 301, 302 and 303 to a POST: reqwest follows with a GET and no body (the Fetch rules); what
/// arrives must not claim a body it does not carry.
#[tokio::test]
async fn mix32_mw_301_302_303_after_post_follow_with_a_bodyless_get() {
    for status in [301u16, 302, 303] {
        let s = redirecting(status, "/final").await;
        let res = within(
            10,
            mw().post(s.url("/start"))
                .header("content-type", "application/json")
                .body(r#"{"item":"book"}"#)
                .send(),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 201, "{status}");
        assert_eq!(res.text().await.unwrap(), "GET", "{status}");
        let hits = s.hits();
        assert_eq!(hits.len(), 2, "{status}");
        assert!(hits[1].body.is_empty(), "{status}");
        let cl = hits[1].header("content-length");
        assert!(
            cl.is_none() || cl.as_deref() == Some("0"),
            "{status}: a GET without body claims content-length {cl:?}"
        );
    }
}

/// reqwest.md: "each attempt the stack makes is one reqwest `execute`, redirects included": a
/// retried POST goes through the redirect again on every attempt, with one key for all.
#[tokio::test]
async fn mix32_mw_each_attempt_is_one_execute_with_its_redirect() {
    let s = scripted(|hit, _| async move {
        if hit.path == "/start" {
            respond(307, &[("location", "/final")], "")
        } else {
            respond(503, &[], "busy")
        }
    })
    .await;
    // Every /final fails: four attempts, each /start then /final.
    let res = within(10, mw().post(s.url("/start")).body("b").send())
        .await
        .unwrap();
    assert_eq!(res.status(), 503, "the last response is returned as it is");
    let hits = s.hits();
    let paths: Vec<&str> = hits.iter().map(|h| h.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/start", "/final"].repeat(4),
        "4 attempts of one execute each"
    );
    let k = key_of(&hits[0]);
    assert!(hits.iter().all(|h| key_of(h) == k && &h.body[..] == b"b"));
}

/// The same through `ReqwestService` under `ClientBuilder`: a sized body is handed to reqwest
/// as bytes and followed on a 307; a retry goes through the redirect again.
#[tokio::test]
async fn mix32_service_retries_through_the_redirect_with_one_key() {
    let s = scripted(|hit, i| async move {
        if hit.path == "/start" {
            respond(307, &[("location", "/final")], "")
        } else if i < 4 {
            respond(503, &[], "busy")
        } else {
            respond(201, &[], hit.body.clone())
        }
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(ReqwestService::new(reqwest::Client::new()));
    let req = http::Request::post(s.url("/start"))
        .body(Full::new(Bytes::from_static(b"sized")))
        .unwrap();
    let res = within(10, client.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(
        res.extensions().get::<reqwest::Url>().unwrap().path(),
        "/final"
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"sized");
    let hits = s.hits();
    assert_eq!(hits.len(), 6, "3 attempts x (start + final)");
    let k = key_of(&hits[0]);
    assert!(!k.is_empty());
    assert!(hits
        .iter()
        .all(|h| key_of(h) == k && &h.body[..] == b"sized"));
}

/// reqwest.md: "One whose exact size is known and at most `with_buffer_limit` is handed to
/// reqwest as bytes ...; any other body is streamed, and reqwest answers a 307 or 308 for it
/// with the redirect response itself." The bound is inclusive.
#[tokio::test]
async fn mix32_service_buffer_limit_decides_whether_a_308_is_followed() {
    let s = redirecting(308, "/final").await;
    let http = ReqwestService::new(reqwest::Client::new()).with_buffer_limit(5);
    let at = http::Request::post(s.url("/start"))
        .body(Full::new(Bytes::from_static(b"12345")))
        .unwrap();
    let res = within(10, http.clone().oneshot(at)).await.unwrap();
    assert_eq!(res.status(), 201, "exactly the limit: followed");
    let over = http::Request::post(s.url("/start"))
        .body(Full::new(Bytes::from_static(b"123456")))
        .unwrap();
    let res = within(10, http.clone().oneshot(over)).await.unwrap();
    assert_eq!(res.status(), 308, "one over: the redirect itself");
    assert_eq!(res.headers()["location"], "/final");
    // A stream of unknown size: the redirect itself, the body sent once.
    let chunks: Vec<Result<http_body::Frame<Bytes>, Infallible>> =
        vec![Ok(http_body::Frame::data(Bytes::from_static(b"ab")))];
    let req = http::Request::post(s.url("/start"))
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let res = within(10, http.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 308);
    let paths: Vec<String> = s.hits().into_iter().map(|h| h.path).collect();
    assert_eq!(paths, ["/start", "/final", "/start", "/start"]);
}

/// A redirect to another origin (another port) must not carry the stack's bearer token.
#[tokio::test]
async fn mix32_cross_origin_redirect_drops_the_stack_bearer_token() {
    let other = scripted(|_, _| async { respond(201, &[], "other") }).await;
    let target: &'static str = Box::leak(other.url("/final").into_boxed_str());
    let s = redirecting(307, target).await;
    let client = mw_auth(AuthLayer::bearer("TOPSECRET-BEARER").unwrap());
    let res = within(10, client.post(s.url("/start")).body("x").send())
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(
        s.hits()[0].header("authorization").as_deref(),
        Some("Bearer TOPSECRET-BEARER")
    );
    let h = &other.hits()[0];
    assert_eq!(
        h.header("authorization"),
        None,
        "token sent to another origin"
    );
    assert_eq!(&h.body[..], b"x");
}

/// auth.md: `AuthLayer::api_key(header, key)` puts a secret in a header such as `x-api-key`;
/// paginate.md refuses a foreign next link because "the credentials the stack adds would follow
/// it". reqwest strips only `Authorization`, `Cookie`, `Cookie2`, `Proxy-Authorization` and
/// `WWW-Authenticate` on a cross-origin redirect; reqwest.md says so and recommends
/// `sturdy_reqwest::same_origin_redirects(10)`, which hands the 307 back instead of following it.
#[tokio::test]
async fn mix32_cross_origin_redirect_does_not_leak_the_api_key_header() {
    let other = scripted(|_, _| async { respond(201, &[], "other") }).await;
    let target: &'static str = Box::leak(other.url("/steal").into_boxed_str());
    let s = redirecting(307, target).await;
    let reqwest = reqwest::Client::builder()
        .redirect(sturdy_reqwest::same_origin_redirects(10))
        .build()
        .unwrap();
    let auth =
        AuthLayer::api_key(HeaderName::from_static("x-api-key"), "TOPSECRET-APIKEY").unwrap();
    let client = reqwest_middleware::ClientBuilder::new(reqwest)
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_auth(auth)
                .build(next)
        }))
        .build();
    let res = within(10, client.get(s.url("/start")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 307);
    assert_eq!(res.headers()["location"], target);
    assert_eq!(
        s.hits()[0].header("x-api-key").as_deref(),
        Some("TOPSECRET-APIKEY")
    );
    assert_eq!(other.count(), 0, "the API key went to {target}");
}

/// The same policy follows redirects on the origin, with the key, and stops after `max`.
#[tokio::test]
async fn mix32_same_origin_policy_follows_on_the_origin_and_counts() {
    let s = redirecting(302, "/final").await;
    let reqwest = reqwest::Client::builder()
        .redirect(sturdy_reqwest::same_origin_redirects(10))
        .build()
        .unwrap();
    let auth = AuthLayer::api_key(HeaderName::from_static("x-api-key"), "k1").unwrap();
    let client = reqwest_middleware::ClientBuilder::new(reqwest)
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new().with_auth(auth).build(next)
        }))
        .build();
    let res = within(10, client.get(s.url("/start")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(s
        .hits()
        .iter()
        .all(|h| h.header("x-api-key").as_deref() == Some("k1")));

    // A loop on the origin: 0 redirects allowed fails at the first.
    let looping = redirecting(307, "/start").await;
    let none = reqwest::Client::builder()
        .redirect(sturdy_reqwest::same_origin_redirects(0))
        .build()
        .unwrap();
    let err = within(10, none.get(looping.url("/start")).send())
        .await
        .unwrap_err();
    assert!(err.is_redirect(), "{err}");
    let err = sturdy_reqwest::from_reqwest_error(err);
    assert_eq!(
        err.to_string(),
        "could not follow a redirect: too many redirects (more than 0)"
    );
}

/// Same-origin redirects keep the API key (control for the test above).
#[tokio::test]
async fn mix32_same_origin_redirect_keeps_the_api_key_header() {
    let s = redirecting(302, "/final").await;
    let client = mw_auth(AuthLayer::api_key(HeaderName::from_static("x-api-key"), "k1").unwrap());
    let res = within(10, client.get(s.url("/start")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(s
        .hits()
        .iter()
        .all(|h| h.header("x-api-key").as_deref() == Some("k1")));
}

/// reqwest.md: `is_redirect()`: too many redirects -> `Other`, may have been processed, not
/// retried; the message "could not follow a redirect: too many redirects"; a POST's message
/// "goes on with what to do next": "it may have been processed: retry with the same
/// idempotency key <key>", the key the server saw on every hop.
#[tokio::test]
async fn mix32_post_307_loop_stops_at_ten_with_may_have_been_processed_and_the_key() {
    let s = redirecting(307, "/start").await;
    let t = Instant::now();
    let err = within(10, mw().post(s.url("/start")).body("loop-body").send())
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5));
    let hits = s.hits();
    assert_eq!(
        hits.len(),
        11,
        "the first request and 10 redirects, not retried"
    );
    let k = key_of(&hits[0]);
    assert!(hits
        .iter()
        .all(|h| key_of(h) == k && &h.body[..] == b"loop-body"));
    let text = err.to_string();
    assert!(
        text.contains("could not follow a redirect: too many redirects"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "it may have been processed: retry with the same idempotency key {k}"
        )),
        "{text}"
    );
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    let e = find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Other);
    assert_eq!(e.report().unwrap().attempts(), 1);
    assert_eq!(e.idempotency_key(), Some(k.as_str()));
}

/// A 308 loop between two origins terminates too, through `ReqwestService`.
#[tokio::test]
async fn mix32_service_two_origin_308_loop_terminates() {
    let b_url = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let a_url = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let (a2, b2) = (a_url.clone(), b_url.clone());
    let a = scripted(move |_, _| {
        let to = b2.get().unwrap().clone();
        async move { respond(308, &[("location", to.as_str())], "") }
    })
    .await;
    let b = scripted(move |_, _| {
        let to = a2.get().unwrap().clone();
        async move { respond(308, &[("location", to.as_str())], "") }
    })
    .await;
    a_url.set(a.url("/a")).unwrap();
    b_url.set(b.url("/b")).unwrap();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(ReqwestService::new(reqwest::Client::new()));
    let req = http::Request::post(a.url("/a"))
        .body(Full::new(Bytes::from_static(b"ping")))
        .unwrap();
    let err: BoxError = within(10, client.oneshot(req)).await.unwrap_err();
    assert_eq!(a.count() + b.count(), 11, "{err}");
    assert!(
        err.to_string()
            .contains("could not follow a redirect: too many redirects"),
        "{err}"
    );
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::MaybeProcessed
    );
}

/// reqwest.md: "A `.timeout()` bounds each attempt (each attempt is one reqwest `execute`)":
/// the redirects of one attempt share one timeout.
#[tokio::test]
async fn mix32_request_timeout_covers_all_redirects_of_one_attempt() {
    let s = scripted(|hit, _| async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        match hit.path.as_str() {
            "/h1" => respond(302, &[("location", "/h2")], ""),
            "/h2" => respond(302, &[("location", "/h3")], ""),
            "/h3" => respond(302, &[("location", "/final")], ""),
            _ => respond(200, &[], "done"),
        }
    })
    .await;
    let err = within(
        10,
        mw().get(s.url("/h1"))
            .timeout(Duration::from_millis(400))
            .with_extension(CallOptions::new().without_retries())
            .send(),
    )
    .await
    .unwrap_err();
    let e = find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{err}");
    assert!(
        s.count() <= 3,
        "the fourth hop is past 400 ms: {}",
        s.count()
    );
    let res = within(
        20,
        mw().get(s.url("/h1"))
            .timeout(Duration::from_secs(8))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.url().path(), "/final");
}

/// A 303 whose Location has a port out of range: reqwest returns the redirect itself (it is
/// not followed); if it were an error it would have to say the POST may have been processed.
#[tokio::test]
async fn mix32_post_redirected_to_an_unusable_port_returns_the_303() {
    let s = redirecting(303, "http://127.0.0.1:99999/orders/o_1").await;
    match within(10, mw().post(s.url("/start")).body("order").send()).await {
        Ok(res) => assert_eq!(res.status(), 303),
        Err(err) => assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{err}"),
    }
    assert_eq!(s.count(), 1);
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// agents.md: "May have been processed" is false "only when no attempt of the call reached the
/// server". A POST the server got and answered 307 (or 303: "see the created order") to a host
/// that refuses connections: the refused hop is a connect error, but the POST itself arrived.
#[tokio::test]
async fn mix32_post_redirected_to_a_refused_port_may_have_been_processed() {
    for status in [307u16, 303] {
        let port = closed_port();
        let to: &'static str =
            Box::leak(format!("http://127.0.0.1:{port}/orders/o_1").into_boxed_str());
        let s = redirecting(status, to).await;
        let err = within(10, mw().post(s.url("/start")).body("order").send())
            .await
            .unwrap_err();
        let hits = s.count();
        assert!(hits >= 1);
        assert!(
            !err.to_string().contains("safe to send again"),
            "{status}: the message invites a resend under a new key after {hits} deliveries: {err}"
        );
        assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{status}: {err}");
    }
}

/// agents.md: "May have been processed" is false "only when no attempt of the call reached the
/// server". A POST answered 303 ("see the created order") with a Location whose scheme reqwest
/// does not follow was received, and may have been processed.
#[tokio::test]
async fn mix32_post_redirected_to_another_scheme_may_have_been_processed() {
    let s = redirecting(303, "ftp://127.0.0.1/orders/o_1").await;
    let err = within(10, mw().post(s.url("/start")).body("order").send())
        .await
        .unwrap_err();
    assert_eq!(s.count(), 1, "{err}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{err}");
}

/// idempotency.md: "A key you set yourself is kept": on every hop of a redirect too.
#[tokio::test]
async fn mix32_mw_key_given_by_caller_is_kept_through_redirects() {
    let s = redirecting(308, "/final").await;
    let res = within(
        10,
        mw().post(s.url("/start"))
            .header("idempotency-key", "caller-key-32")
            .body("b")
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    assert!(s.hits().iter().all(|h| key_of(h) == "caller-key-32"));
}
