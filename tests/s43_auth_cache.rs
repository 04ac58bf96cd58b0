//! The OAuth2 token cache of docs/guides/auth.md and `sturdy_auth::ClientCredentials`'s rustdoc,
//! on paused time against an in-process token endpoint: reuse until `expiry - min(60 s,
//! lifetime / 2)`, background refresh while the old token is valid, one request for N callers,
//! a caller dropped mid-fetch, the backoff of a failing endpoint (1 s doubling to 60 s, the last
//! error at once meanwhile), hostile token responses (`expires_in` 0, negative, huge, missing,
//! a string; invalid JSON; a 10 MiB body; 401 and 500; a stall) and the error each one gives.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use sturdy::auth::{ClientCredentials, ExposeSecret, Token};
use sturdy::core::{Error, ErrorKind};
use tokio::time::{advance, Instant};

use crate::s43_util::{source, status_json, token_json, Answer, Endpoint, TOKEN_URL};

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn value(t: &Token) -> String {
    t.secret().expose_secret().to_owned()
}

/// The cached token, without waiting: `None` when `get` would have to wait.
fn cached(src: &ClientCredentials) -> Option<Result<Token, Error>> {
    src.get().now_or_never()
}

#[tokio::test(start_paused = true)]
async fn an_hour_token_is_reused_until_59_minutes_then_refreshed_in_the_background() {
    let ep = Endpoint::new(token_json("t-2", Some("3600")));
    ep.then(token_json("t-1", Some("3600")));
    let src = source(&ep);
    assert_eq!(value(&src.get().await.unwrap()), "t-1");
    settle().await;
    advance(Duration::from_secs(3539)).await;
    assert_eq!(value(&cached(&src).unwrap().unwrap()), "t-1");
    settle().await;
    assert_eq!(ep.count(), 1, "refreshed before expiry - 60 s");
    advance(Duration::from_secs(2)).await;
    // Due for refresh: the still-valid token is returned at once, the refresh runs meanwhile.
    assert_eq!(value(&cached(&src).unwrap().unwrap()), "t-1");
    settle().await;
    assert_eq!(ep.count(), 2, "no background refresh at expiry - 59 s");
    assert_eq!(value(&cached(&src).unwrap().unwrap()), "t-2");
}

#[tokio::test(start_paused = true)]
async fn a_ten_second_token_is_refreshed_at_half_its_lifetime() {
    let ep = Endpoint::new(token_json("t-2", Some("10")));
    ep.then(token_json("t-1", Some("10")));
    let src = source(&ep);
    assert_eq!(value(&src.get().await.unwrap()), "t-1");
    advance(Duration::from_millis(4_900)).await;
    assert_eq!(value(&cached(&src).unwrap().unwrap()), "t-1");
    settle().await;
    assert_eq!(ep.count(), 1);
    advance(Duration::from_millis(200)).await;
    assert_eq!(value(&cached(&src).unwrap().unwrap()), "t-1");
    settle().await;
    assert_eq!(ep.count(), 2);
    assert_eq!(value(&cached(&src).unwrap().unwrap()), "t-2");
}

#[tokio::test(start_paused = true)]
async fn a_hundred_callers_without_a_token_share_one_request() {
    let ep = Endpoint::new(Answer::After(
        Duration::from_secs(1),
        200,
        r#"{"access_token":"t-1","token_type":"Bearer","expires_in":3600}"#.into(),
    ));
    let src = source(&ep);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let s = src.clone();
        tasks.push(tokio::spawn(async move { s.get().await }));
    }
    for t in tasks {
        assert_eq!(value(&t.await.unwrap().unwrap()), "t-1");
    }
    assert_eq!(ep.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_caller_dropped_mid_fetch_does_not_cancel_the_request_for_the_next() {
    let ep = Endpoint::new(Answer::After(
        Duration::from_secs(5),
        200,
        r#"{"access_token":"t-1","token_type":"Bearer","expires_in":3600}"#.into(),
    ));
    let src = source(&ep);
    let mut first = tokio_test::task::spawn(src.get());
    tokio_test::assert_pending!(first.poll());
    settle().await;
    drop(first);
    advance(Duration::from_secs(2)).await;
    let start = Instant::now();
    assert_eq!(value(&src.get().await.unwrap()), "t-1");
    assert_eq!(
        ep.count(),
        1,
        "the dropped caller's request was cancelled or repeated"
    );
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(3),
        "the next caller joined the request"
    );
}

#[tokio::test(start_paused = true)]
async fn every_caller_dropped_mid_fetch_leaves_no_wedged_state() {
    let ep = Endpoint::new(token_json("t-2", Some("3600")));
    ep.then(Answer::After(
        Duration::from_secs(5),
        200,
        r#"{"access_token":"t-1","token_type":"Bearer","expires_in":3600}"#.into(),
    ));
    let src = source(&ep);
    for _ in 0..3 {
        let mut f = tokio_test::task::spawn(src.get());
        tokio_test::assert_pending!(f.poll());
        drop(f);
    }
    settle().await;
    advance(Duration::from_secs(6)).await;
    settle().await;
    assert_eq!(value(&cached(&src).unwrap().unwrap()), "t-1");
    assert_eq!(ep.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_the_valid_token_and_the_expired_one_is_not_used() {
    let ep = Endpoint::new(status_json(503, r#"{"error":"temporarily_unavailable"}"#));
    ep.then(token_json("t-1", Some("3600")));
    let src = source(&ep);
    assert_eq!(value(&src.get().await.unwrap()), "t-1");
    advance(Duration::from_secs(3541)).await;
    assert_eq!(value(&cached(&src).unwrap().unwrap()), "t-1");
    settle().await;
    assert_eq!(ep.count(), 2);
    // During the backoff the valid token is still handed out, without asking again.
    assert_eq!(value(&cached(&src).unwrap().unwrap()), "t-1");
    settle().await;
    assert_eq!(ep.count(), 2);
    advance(Duration::from_secs(60)).await;
    // Expired (3601 s): the 503 surfaces; never the expired token.
    let err = src.get().await.unwrap_err();
    assert_eq!(
        *err.kind(),
        ErrorKind::Server(http::StatusCode::SERVICE_UNAVAILABLE)
    );
    assert!(err.is_retryable());
    assert!(err.to_string().contains(TOKEN_URL), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_failing_endpoint_is_asked_again_after_1_2_4_8_16_32_60_60_seconds() {
    let ep = Endpoint::new(status_json(500, r#"{"error":"server_error"}"#));
    let src = source(&ep);
    let mut gaps = Vec::new();
    let mut last = Instant::now();
    assert!(src.get().await.is_err());
    while gaps.len() < 8 {
        let before = ep.count();
        let err = src.get().await.unwrap_err();
        if ep.count() > before {
            gaps.push((Instant::now() - last).as_secs());
            last = Instant::now();
        } else {
            // Within the backoff: the last error at once, saying when the endpoint is asked again.
            assert!(err.to_string().contains("not asked again"), "{err}");
            assert_eq!(
                *err.kind(),
                ErrorKind::Server(http::StatusCode::INTERNAL_SERVER_ERROR)
            );
        }
        advance(Duration::from_millis(250)).await;
    }
    assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 60, 60]);
}

/// How many seconds from now the first background refresh starts (at `lifetime - min(60 s,
/// lifetime / 2)`), found to the second.
async fn refresh_after(src: &ClientCredentials, ep: &Endpoint, max_s: u64) -> Option<u64> {
    let start = Instant::now();
    let before = ep.count();
    while (Instant::now() - start).as_secs() < max_s {
        advance(Duration::from_secs(1)).await;
        let _ = cached(src);
        settle().await;
        if ep.count() > before {
            return Some((Instant::now() - start).as_secs());
        }
    }
    None
}

#[tokio::test(start_paused = true)]
async fn expires_in_huge_is_clamped_to_24_hours_and_missing_means_one_hour() {
    // (expires_in as JSON, refresh second expected: lifetime - 60)
    let cases: [(Option<&str>, u64); 7] = [
        (Some("1e30"), 86_340),
        (Some("18446744073709551615"), 86_340),
        (Some("1e400"), 86_340),
        (Some("99999999999999999999999999999999"), 86_340),
        (None, 3_540),
        (Some("null"), 3_540),
        (Some("\"3600\""), 3_540),
    ];
    for (expires, want) in cases {
        let ep = Endpoint::new(token_json("t-n", Some("3600")));
        ep.then(token_json("t-0", expires));
        let src = source(&ep);
        let t = src
            .get()
            .await
            .unwrap_or_else(|e| panic!("expires_in {expires:?}: {e}"));
        assert_eq!(value(&t), "t-0");
        // Jump near the point, then step by seconds.
        advance(Duration::from_secs(want - 3)).await;
        let _ = cached(&src);
        settle().await;
        assert_eq!(
            ep.count(),
            1,
            "expires_in {expires:?}: refreshed before {want} s"
        );
        let got = refresh_after(&src, &ep, 10).await.map(|s| s + want - 3);
        assert_eq!(got, Some(want), "expires_in {expires:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn expires_in_zero_negative_or_not_a_number_is_a_clear_error() {
    for expires in ["0", "-5", "-1e400", "\"abc\"", "true", "[]", "{}", "\"\""] {
        let ep = Endpoint::new(token_json("t-0", Some(expires)));
        let src = source(&ep);
        let err = src
            .get()
            .await
            .map(|_| ())
            .expect_err(&format!("expires_in {expires} was accepted"));
        let msg = err.to_string();
        assert_eq!(*err.kind(), ErrorKind::Auth, "{expires}: {msg}");
        assert!(!err.is_retryable(), "{expires}: {msg}");
        assert!(msg.contains(TOKEN_URL), "{expires}: {msg}");
        assert!(msg.contains("expire"), "{expires}: {msg}");
    }
}

#[tokio::test(start_paused = true)]
async fn token_endpoint_failures_say_what_to_fix_and_whether_to_retry() {
    // (answer, kind, retryable, words the message must hold)
    let cases: Vec<(Answer, ErrorKind, bool, &str)> = vec![
        (
            status_json(401, r#"{"error":"invalid_client"}"#),
            ErrorKind::Auth,
            false,
            "invalid_client (401 Unauthorized): the client id or secret is wrong",
        ),
        (
            status_json(
                400,
                r#"{"error":"invalid_scope","error_description":"nope"}"#,
            ),
            ErrorKind::Auth,
            false,
            "invalid_scope",
        ),
        (
            status_json(500, "<html>oops</html>"),
            ErrorKind::Server(http::StatusCode::INTERNAL_SERVER_ERROR),
            true,
            "500",
        ),
        (
            status_json(429, "{}"),
            ErrorKind::RateLimited { retry_after: None },
            true,
            "429",
        ),
        (
            status_json(200, "{not json"),
            ErrorKind::Auth,
            false,
            "not a JSON object",
        ),
        (
            status_json(200, r#"{"token_type":"Bearer"}"#),
            ErrorKind::Auth,
            false,
            "no access_token",
        ),
        (
            status_json(200, r#"{"access_token":"t","token_type":"mac"}"#),
            ErrorKind::Auth,
            false,
            "Bearer",
        ),
    ];
    for (answer, kind, retryable, words) in cases {
        let ep = Endpoint::new(answer.clone());
        let src = source(&ep);
        let err = src.get().await.map(|_| ()).unwrap_err();
        let msg = err.to_string();
        assert_eq!(
            std::mem::discriminant(err.kind()),
            std::mem::discriminant(&kind),
            "{answer:?}: {msg}"
        );
        assert_eq!(err.is_retryable(), retryable, "{answer:?}: {msg}");
        assert!(msg.contains(TOKEN_URL), "{answer:?}: {msg}");
        assert!(msg.contains(words), "{answer:?}: {msg}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_ten_mib_token_response_is_refused_with_an_error_naming_the_endpoint() {
    let big = format!(
        r#"{{"access_token":"{}","token_type":"Bearer","expires_in":3600}}"#,
        "a".repeat(10 << 20)
    );
    let ep = Endpoint::new(Answer::Now(200, big.into()));
    let src = source(&ep);
    let err = src.get().await.map(|_| ()).unwrap_err();
    assert!(err.to_string().contains(TOKEN_URL), "{err}");
    // Backs off as after any failure.
    let again = src.get().await.map(|_| ()).unwrap_err();
    assert_eq!(ep.count(), 1, "{again}");
}

#[tokio::test(start_paused = true)]
async fn a_stalled_token_endpoint_fails_at_the_request_timeout_and_is_not_hammered() {
    let ep = Endpoint::new(Answer::Stall);
    let src = source(&ep).with_request_timeout(Duration::from_secs(5));
    let start = Instant::now();
    let err = src.get().await.map(|_| ()).unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(*err.kind(), ErrorKind::Timeout);
    assert!(err.is_retryable());
    assert!(err.to_string().contains(TOKEN_URL), "{err}");
    let again = cached(&src).expect("the last error at once during the backoff");
    assert!(again.is_err());
    assert_eq!(ep.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_default_request_timeout_is_30_seconds() {
    let ep = Endpoint::new(Answer::Stall);
    let src = source(&ep);
    let start = Instant::now();
    let err = src.get().await.map(|_| ()).unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(30), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_setter_gives_a_cache_of_its_own_and_clones_share_one() {
    let ep = Endpoint::new(token_json("t", Some("3600")));
    let a = source(&ep);
    let b = a.clone();
    a.get().await.unwrap();
    b.get().await.unwrap();
    assert_eq!(ep.count(), 1, "clones share one cache");
    let c = a.clone().with_scopes(["other"]);
    c.get().await.unwrap();
    assert_eq!(ep.count(), 2, "a with_* setter makes a cache of its own");
    assert!(ep.bodies.lock().unwrap()[1].contains("scope=other"));
}

#[tokio::test(start_paused = true)]
async fn with_param_refuses_the_names_the_source_sets_and_sends_others() {
    let ep = Endpoint::new(token_json("t", Some("3600")));
    for name in ["grant_type", "scope", "client_id", "client_secret", ""] {
        let r = source(&ep).with_param(name, "x");
        let err = r.map(|_| ()).expect_err(name);
        assert_eq!(*err.kind(), ErrorKind::Config, "{name}: {err}");
    }
    let src = source(&ep)
        .with_param("resource", "https://api.example.com/")
        .unwrap()
        .with_audience("aud-1")
        .with_client_auth(sturdy::auth::ClientAuth::SecretPost);
    src.get().await.unwrap();
    let body = ep.bodies.lock().unwrap()[0].clone();
    for part in [
        "grant_type=client_credentials",
        "resource=https%3A%2F%2Fapi.example.com%2F",
        "audience=aud-1",
        "client_id=my-client",
        "client_secret=s3cr3t-Client-Secret",
    ] {
        assert!(body.contains(part), "{part} not in {body}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_token_url_must_be_absolute() {
    let ep = Endpoint::new(token_json("t", Some("3600")));
    for url in ["/oauth/token", "auth.example.com/token", "", "http://"] {
        let r = ClientCredentials::new(ep.client(), url, "id", "secret");
        let err = r.map(|_| ()).expect_err(url);
        assert_eq!(*err.kind(), ErrorKind::Config, "{url}: {err}");
    }
}

#[tokio::test(start_paused = true)]
async fn clones_used_from_many_tasks_compile_and_share() {
    fn send_sync<T: Send + Sync + Clone + 'static>(_: &T) {}
    let ep = Endpoint::new(token_json("t", Some("3600")));
    let src = Arc::new(source(&ep));
    send_sync(&*src);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = src.clone();
        tasks.push(tokio::spawn(
            async move { s.get().await.map(|t| value(&t)) },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "t");
    }
    assert_eq!(ep.count(), 1);
}
