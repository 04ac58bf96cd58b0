//! sturdy-reqwest's `SturdyMiddleware` read literally, against a scripted hyper server on
//! loopback: `Retry-After` in every shape, which methods are retried, bodies that can and cannot
//! be replayed, cancellation by the caller, and what the errors say.

use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::StreamBody;
use sturdy::core::{Delivery, ErrorKind, RateLimited};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy_reqwest::{delivery, find, NextAttempt, ReqwestService, SturdyMiddleware};

use crate::client31_util::*;

fn gap(s: &Srv, i: usize) -> Duration {
    let g = s.got();
    g[i + 1].at.duration_since(g[i].at)
}

#[test]
fn client31_shared_types_are_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<reqwest_middleware::ClientWithMiddleware>();
    check::<SturdyMiddleware>();
    check::<NextAttempt>();
    check::<ReqwestService>();
    fn send<T: Send>(_: &T) {}
    let c = mw(true);
    let fut = c.get("http://127.0.0.1:9/").send();
    send(&fut);
}

#[tokio::test]
async fn client31_retry_after_zero_on_429_retried_quickly() {
    let s = serve(vec![with_ra(429, "0"), ok()]).await;
    let t = Instant::now();
    let res = within(10, mw(true).get(s.url("/a")).send()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(s.count(), 2);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test]
async fn client31_retry_after_one_second_is_honoured_not_sooner() {
    let s = serve(vec![with_ra(503, "1"), ok()]).await;
    let res = within(10, mw(true).get(s.url("/a")).send()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(s.count(), 2);
    let g = gap(&s, 0);
    // never sooner than asked, plus at most 20 % (generous slack for a loaded machine)
    assert!(g >= Duration::from_millis(990), "{g:?}");
    assert!(g < Duration::from_secs(4), "{g:?}");
}

#[tokio::test]
async fn client31_retry_after_past_date_retries_at_once_not_after_backoff() {
    // A backoff of 2 s to 4 s: "a date already past asks for no wait at all, so the retry
    // follows just as soon, not after the backoff".
    let retry = RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_secs(2), Duration::from_secs(4)).unwrap(),
        )
        .with_seed(31);
    let s = serve(vec![with_ra(503, "Sat, 01 Jan 2000 00:00:00 GMT"), ok()]).await;
    let res = within(10, mw_with(retry, true).get(s.url("/a")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(s.count(), 2);
    assert!(gap(&s, 0) < Duration::from_secs(1), "{:?}", gap(&s, 0));
}

#[tokio::test]
async fn client31_retry_after_huge_fails_at_once_with_rate_limited() {
    let s = serve(vec![with_ra(429, "99999999999999999999"), ok()]).await;
    let t = Instant::now();
    let err = within(10, mw(true).get(s.url("/a")).send())
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(s.count(), 1);
    let rl = find::<RateLimited>(&err).expect("RateLimited in the chain");
    assert!(rl.retry_after() > Duration::from_secs(60), "{rl:?}");
}

#[tokio::test]
async fn client31_retry_after_huge_date_fails_at_once() {
    let s = serve(vec![with_ra(503, "Fri, 31 Dec 9999 23:59:59 GMT"), ok()]).await;
    let err = within(10, mw(true).get(s.url("/a")).send())
        .await
        .unwrap_err();
    assert_eq!(s.count(), 1);
    assert!(find::<RateLimited>(&err).is_some(), "{err}");
}

#[tokio::test]
async fn client31_retry_after_negative_or_garbage_falls_back_to_backoff() {
    for bad in [
        "-5",
        "soon",
        "1.5",
        "",
        "0x10",
        "Mon, 99 Foo 2020 99:99:99 GMT",
    ] {
        let s = serve(vec![with_ra(503, bad), ok()]).await;
        let res = within(10, mw(true).get(s.url("/a")).send())
            .await
            .unwrap_or_else(|e| panic!("{bad:?}: {e}"));
        assert_eq!(res.status(), 200, "{bad:?}");
        assert_eq!(s.count(), 2, "{bad:?}");
        assert!(gap(&s, 0) < Duration::from_secs(2), "{bad:?}");
    }
}

#[tokio::test]
async fn client31_idempotent_methods_retried_without_key() {
    for m in ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"] {
        let s = serve(vec![status(503), status(503), ok()]).await;
        let method = reqwest::Method::from_bytes(m.as_bytes()).unwrap();
        let res = within(10, mw(false).request(method, s.url("/r")).send())
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{m}");
        assert_eq!(s.count(), 3, "{m}");
        assert!(s.header_values("idempotency-key").is_empty(), "{m}");
    }
}

#[tokio::test]
async fn client31_post_without_key_503_sent_once_response_returned() {
    let s = serve(vec![status(503), ok()]).await;
    let res = within(10, mw(false).post(s.url("/orders")).body("x").send())
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(s.count(), 1);
}

#[tokio::test]
async fn client31_patch_with_key_retried_with_one_key_and_same_body() {
    let s = serve(vec![status(503), status(502), ok()]).await;
    let res = within(
        10,
        mw(true)
            .patch(s.url("/orders/1"))
            .json(&serde_json::json!({"n": 1}))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let got = s.got();
    assert_eq!(got.len(), 3);
    let keys = s.header_values("idempotency-key");
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|k| k == &keys[0] && !k.is_empty()));
    assert!(got
        .iter()
        .all(|g| g.method == "PATCH" && g.body == got[0].body));
    assert_eq!(&got[0].body[..], br#"{"n":1}"#);
}

fn stream_body(chunks: Vec<&'static [u8]>) -> reqwest::Body {
    let frames = chunks
        .into_iter()
        .map(|c| Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from_static(c))));
    reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(frames)))
}

#[tokio::test]
async fn client31_streaming_body_buffered_and_replayed_whole() {
    let s = serve(vec![status(503), ok()]).await;
    let res = within(
        10,
        mw(true)
            .post(s.url("/upload"))
            .body(stream_body(vec![b"hello ", b"streamed ", b"world"]))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let got = s.got();
    assert_eq!(got.len(), 2);
    for g in &got {
        assert_eq!(&g.body[..], b"hello streamed world");
    }
}

#[tokio::test]
async fn client31_streaming_body_over_limit_fails_before_sending() {
    let s = serve(vec![ok()]).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(
            SturdyMiddleware::new(|next| {
                sturdy::ClientBuilder::new()
                    .with_retry(quick_retry())
                    .build(next)
            })
            .with_body_limit(8),
        )
        .build();
    let err = within(
        10,
        client
            .post(s.url("/upload"))
            .body(stream_body(vec![b"0123456789", b"abcdef"]))
            .send(),
    )
    .await
    .unwrap_err();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.count(), 0);
    assert_eq!(s.conns.load(std::sync::atomic::Ordering::SeqCst), 0);
    let e = find::<sturdy::core::Error>(&err).expect("sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Body, "{err}");
    // "fails the call with a Body error before anything is sent"
    assert_eq!(delivery(&err), Delivery::NotSent, "{err}");
    assert!(
        !err.to_string().contains("may have been processed"),
        "{err}"
    );
}

#[tokio::test]
async fn client31_streaming_body_that_fails_is_never_sent() {
    let s = serve(vec![ok()]).await;
    let frames = vec![
        Ok(hyper::body::Frame::data(Bytes::from_static(b"abc"))),
        Err(std::io::Error::other("disk went away")),
    ];
    let body = reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(frames)));
    let err = within(10, mw(true).post(s.url("/upload")).body(body).send())
        .await
        .unwrap_err();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.count(), 0);
    assert_eq!(delivery(&err), Delivery::NotSent, "{err}");
}

#[tokio::test]
async fn client31_drop_mid_backoff_sends_nothing_more() {
    let s = serve(vec![with_ra(503, "1"), ok()]).await;
    let client = mw(true);
    let r = tokio::time::timeout(Duration::from_millis(400), client.get(s.url("/a")).send()).await;
    assert!(
        r.is_err(),
        "the call should still be waiting for Retry-After"
    );
    assert_eq!(s.count(), 1);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(
        s.count(),
        1,
        "a retry was sent after the caller dropped the call"
    );
}

#[tokio::test]
async fn client31_drop_mid_attempt_sends_nothing_more() {
    let s = serve(vec![Act::Stall]).await;
    let client = mw(true);
    let fut = client.post(s.url("/orders")).body("x").send();
    let h = tokio::spawn(fut);
    // wait for the request to arrive, then abort the caller's task
    let t = Instant::now();
    while s.count() == 0 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(s.count(), 1);
    h.abort();
    let _ = h.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.count(), 1);
    assert_eq!(s.conns.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn client31_close_after_read_unkeyed_post_says_maybe_processed() {
    let s = serve(vec![Act::Close, ok()]).await;
    let err = within(10, mw(false).post(s.url("/orders")).body("x").send())
        .await
        .unwrap_err();
    assert_eq!(
        s.count(),
        1,
        "an unkeyed POST that may have arrived is not retried"
    );
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    let msg = err.to_string();
    assert!(!msg.contains("not sent"), "{msg}");
    let dbg = format!("{err:?}");
    assert!(!dbg.contains("NotSent"), "{dbg}");
}

#[tokio::test]
async fn client31_close_after_read_keyed_post_retried() {
    let s = serve(vec![Act::Close, Act::Close, ok()]).await;
    let res = within(10, mw(true).post(s.url("/orders")).body("x").send())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(s.count(), 3);
    let keys = s.header_values("idempotency-key");
    assert!(keys.iter().all(|k| k == &keys[0]));
}

#[tokio::test]
async fn client31_reqwest_timeout_on_stall_named_and_hides_query_secret() {
    let s = serve(vec![Act::Stall]).await;
    let retry = quick_retry().with_max_attempts(2);
    let err = within(
        10,
        mw_with(retry, false)
            .post(s.url("/orders?api_key=SECRET31"))
            .body("x")
            .timeout(Duration::from_millis(150))
            .send(),
    )
    .await
    .unwrap_err();
    // A POST without key that timed out may have been processed: sent once.
    assert_eq!(s.count(), 1);
    let msg = err.to_string();
    assert!(msg.contains("timed out (reqwest's timeout)"), "{msg}");
    assert!(!msg.contains("not sent"), "{msg}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert!(!msg.contains("SECRET31"), "{msg}");
    assert!(!format!("{err:?}").contains("SECRET31"));
}

#[tokio::test]
async fn client31_reqwest_timeout_get_retried_and_reported() {
    let s = serve(vec![Act::Stall]).await;
    let retry = quick_retry().with_max_attempts(3);
    let err = within(
        10,
        mw_with(retry, true)
            .get(s.url("/a"))
            .timeout(Duration::from_millis(100))
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(s.count(), 3);
    assert_eq!(
        err.to_string(),
        "gave up after 3 attempts: timed out (reqwest's timeout)"
    );
    let e = find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert_eq!(e.report().unwrap().attempts(), 3);
}

#[tokio::test]
async fn client31_retry_deadline_bounds_whole_call_against_long_retry_after() {
    // Retry-After 2 s, deadline 500 ms: the sleep would end past the deadline, so it is not
    // slept and the caller learns the wait.
    let s = serve(vec![with_ra(503, "2"), ok()]).await;
    let retry = quick_retry().with_deadline(Duration::from_millis(500));
    let t = Instant::now();
    let err = within(10, mw_with(retry, true).get(s.url("/a")).send())
        .await
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(s.count(), 1);
    let rl = find::<RateLimited>(&err).expect("RateLimited");
    assert!(rl.retry_after() >= Duration::from_secs(1), "{rl:?}");
}

#[tokio::test]
async fn client31_many_tasks_share_one_client() {
    let s = serve(vec![status(503), ok()]).await;
    let client = mw(true);
    let mut hs = Vec::new();
    for i in 0..16 {
        let c = client.clone();
        let url = s.url(&format!("/p/{i}"));
        hs.push(tokio::spawn(async move { c.get(url).send().await }));
    }
    for h in hs {
        let res = within(10, h).await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(s.count(), 17);
}

#[tokio::test]
async fn client31_https_url_without_reqwest_tls_backend_says_so() {
    // The dev-dependency reqwest has no TLS feature; the docs say to turn one on for https://.
    let (addr, conns) = {
        let (cert, key) = self_signed(&["127.0.0.1"], false);
        serve_tls(cert, &key).await
    };
    let err = within(10, mw(true).get(format!("https://{addr}/")).send())
        .await
        .unwrap_err();
    // reqwest reports the https URL it cannot use as a connect error, raised at once, before any
    // connection: the request's own URL, so not sent (reqwest.md's table; a redirect's target,
    // met after a wait, would be "may have been processed").
    assert_eq!(delivery(&err), Delivery::NotSent, "{err}");
    let e = find::<sturdy::core::Error>(&err).expect("sturdy's error");
    assert_eq!(e.kind(), &ErrorKind::Config, "{err}");
    let msg = err.to_string().to_lowercase();
    assert!(
        msg.contains("https") || msg.contains("tls") || msg.contains("scheme"),
        "the message should name the missing TLS support: {msg}"
    );
    let _ = conns;
}

#[tokio::test]
async fn client31_reqwest_service_under_client_builder_retries_503_with_retry_after_zero() {
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;
    let s = serve(vec![with_ra(503, "0"), ok()]).await;
    let client = sturdy::ClientBuilder::new()
        .with_retry(quick_retry())
        .build(ReqwestService::new(reqwest::Client::new()));
    let req = http::Request::get(s.url("/a"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = within(10, client.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 200);
    let _ = res.into_body().collect().await.unwrap();
    assert_eq!(s.count(), 2);
}

#[tokio::test]
async fn client31_unkeyed_post_503_with_retry_after_fails_rate_limited_not_sent_never_said() {
    let s = serve(vec![with_ra(503, "1"), ok()]).await;
    let t = Instant::now();
    let err = within(10, mw(false).post(s.url("/orders")).body("x").send())
        .await
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(s.count(), 1);
    let rl = find::<RateLimited>(&err).expect("RateLimited");
    assert!(rl.retry_after() >= Duration::from_secs(1), "{rl:?}");
    assert!(!err.to_string().contains("not sent"), "{err}");
}

#[tokio::test]
async fn client31_drop_while_waiting_for_learned_pause_sends_nothing() {
    let s = serve(vec![with_ra(429, "1"), ok()]).await;
    let client = mw_with(quick_retry().with_max_attempts(1), true);
    let first = within(10, client.get(s.url("/a")).send()).await;
    assert!(
        first.is_err(),
        "one attempt, 429 with Retry-After: {first:?}"
    );
    assert_eq!(s.count(), 1);
    let r = tokio::time::timeout(Duration::from_millis(300), client.get(s.url("/b")).send()).await;
    assert!(r.is_err(), "the second call should wait out the pause");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        s.count(),
        1,
        "a dropped call was sent after its caller left"
    );
}

#[tokio::test]
async fn client31_call_options_extension_reaches_retry_layer() {
    let s = serve(vec![status(503), ok()]).await;
    let res = within(
        10,
        mw(true)
            .get(s.url("/a"))
            .with_extension(sturdy::core::CallOptions::new().without_retries())
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(s.count(), 1);
}

#[tokio::test]
async fn client31_response_keeps_url_remote_addr_and_auth_on_every_attempt() {
    let s = serve(vec![status(503), ok()]).await;
    let res = within(
        10,
        mw(true)
            .get(s.url("/a/b"))
            .query(&[("q", "1")])
            .basic_auth("user", Some("pw"))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.url().path(), "/a/b");
    assert_eq!(res.remote_addr(), Some(s.addr));
    let auth = s.header_values("authorization");
    assert_eq!(auth.len(), 2);
    assert!(auth.iter().all(|a| a.starts_with("Basic ")), "{auth:?}");
}
