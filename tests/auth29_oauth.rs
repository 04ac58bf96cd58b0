//! The OAuth2 client-credentials cache and the auth layer's token waits, on paused time, against
//! what `docs/guides/auth.md` and the crate docs of `sturdy-auth` promise.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, BoxFuture, ClientAuth, ExposeSecret, Token, TokenSource};
use sturdy::core::classify::delivery;
use sturdy::core::events::Event;
use sturdy::core::{BoxError, Delivery, ErrorKind, ErrorSummary};
use tokio::time::{advance, Instant};
use tower::{Layer, Service, ServiceExt};

use crate::auth29_util::{
    api, creds, endpoint, get, sturdy_err, tok, token_body, Reply, Seen, SECRET, TOKEN_URL,
};

/// Lets spawned tasks (the token request) run; moves the paused clock by 1 ms.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn token_is_reused_until_60s_before_expiry_then_refreshed_in_background() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| tok(n, 3600)));
    assert_eq!(cc.get().await.unwrap().secret().expose_secret(), "t-1");
    advance(Duration::from_secs(3538)).await;
    assert_eq!(cc.get().await.unwrap().secret().expose_secret(), "t-1");
    settle().await;
    assert_eq!(seen.calls(), 1, "refreshed before expiry - 60 s");
    advance(Duration::from_secs(2)).await;
    // Due for refresh: the still-valid token comes back at once, the refresh runs behind.
    let start = Instant::now();
    assert_eq!(cc.get().await.unwrap().secret().expose_secret(), "t-1");
    assert_eq!(start.elapsed(), Duration::ZERO);
    settle().await;
    assert_eq!(seen.calls(), 2);
    assert_eq!(cc.get().await.unwrap().secret().expose_secret(), "t-2");
}

#[tokio::test(start_paused = true)]
async fn short_lived_token_is_refreshed_at_half_its_lifetime() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| tok(n, 10)));
    cc.get().await.unwrap();
    advance(Duration::from_millis(4_900)).await;
    cc.get().await.unwrap();
    settle().await;
    assert_eq!(seen.calls(), 1, "refreshed before half the lifetime");
    advance(Duration::from_millis(200)).await;
    cc.get().await.unwrap();
    settle().await;
    assert_eq!(seen.calls(), 2, "not refreshed at half the lifetime");
}

#[tokio::test(start_paused = true)]
async fn with_skew_moves_the_refresh_point() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| tok(n, 3600))).with_skew(Duration::from_secs(10));
    cc.get().await.unwrap();
    advance(Duration::from_secs(3589)).await;
    cc.get().await.unwrap();
    settle().await;
    assert_eq!(seen.calls(), 1);
    advance(Duration::from_secs(2)).await;
    cc.get().await.unwrap();
    settle().await;
    assert_eq!(seen.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn callers_do_not_wait_for_a_slow_refresh_while_the_token_is_valid() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| {
        if n == 1 {
            tok(n, 3600)
        } else {
            tok(n, 3600).after(Duration::from_secs(20))
        }
    }));
    cc.get().await.unwrap();
    advance(Duration::from_secs(3550)).await;
    for _ in 0..20 {
        let start = Instant::now();
        assert_eq!(cc.get().await.unwrap().secret().expose_secret(), "t-1");
        assert_eq!(start.elapsed(), Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(seen.calls(), 2, "one refresh for all the callers");
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(cc.get().await.unwrap().secret().expose_secret(), "t-2");
}

#[tokio::test(start_paused = true)]
async fn one_token_request_for_a_hundred_callers() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| {
        tok(n, 3600).after(Duration::from_secs(1))
    }));
    let all = futures_util::future::join_all((0..100).map(|_| cc.get())).await;
    assert!(all
        .iter()
        .all(|t| t.as_ref().unwrap().secret().expose_secret() == "t-1"));
    assert_eq!(seen.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn one_token_request_for_fifty_tasks_through_the_layer() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let svc = AuthLayer::oauth2(creds(endpoint(&ts, |n| {
        tok(n, 3600).after(Duration::from_millis(300))
    })))
    .layer(api(&aps, |_, a| if a == "Bearer t-1" { 200 } else { 401 }));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let svc = svc.clone();
        tasks.push(crate::auth29_util::spawn_call(svc, get("/o")));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(200));
    }
    assert_eq!(ts.calls(), 1);
    assert_eq!(aps.calls(), 50);
}

#[tokio::test(start_paused = true)]
async fn failed_refresh_keeps_the_token_and_backs_off_1s_doubling_to_60s() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| {
        if n == 1 {
            tok(n, 86_400)
        } else {
            Reply::new(503, "busy")
        }
    }))
    .with_skew(Duration::from_secs(2000));
    cc.get().await.unwrap();
    // Half the lifetime bounds the skew (43,200 s), so 2,000 s it is: due at 84,400 s.
    advance(Duration::from_secs(84_401)).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(400) {
        let t = cc
            .get()
            .await
            .expect("a valid token is kept while refreshes fail");
        assert_eq!(t.secret().expose_secret(), "t-1");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let times = seen.times();
    let gaps: Vec<f64> = times[1..].windows(2).map(|w| secs(w[1] - w[0])).collect();
    let want = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0];
    assert!(gaps.len() >= want.len(), "gaps {gaps:?}");
    for (g, w) in gaps.iter().zip(want) {
        assert!((g - w).abs() <= 0.3, "gaps {gaps:?}, want {want:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn no_token_during_backoff_gets_the_last_error_at_once_saying_when() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| {
        if n < 3 {
            Reply::new(503, "down")
        } else {
            tok(n, 3600)
        }
    }));
    let e1 = cc.get().await.unwrap_err();
    assert_eq!(
        e1.kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE)
    );
    let start = Instant::now();
    let e2 = cc.get().await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(seen.calls(), 1, "hammered during the backoff");
    assert!(e2.is_retryable());
    let m = e2.to_string();
    assert!(
        m.contains("again") && (m.contains("1s") || m.contains("second")),
        "does not say when the endpoint is asked again: {m}"
    );
    advance(Duration::from_millis(1_100)).await;
    assert!(cc.get().await.is_err());
    assert_eq!(seen.calls(), 2);
    // The next backoff is 2 s.
    advance(Duration::from_millis(1_500)).await;
    assert!(cc.get().await.is_err());
    assert_eq!(seen.calls(), 2);
    advance(Duration::from_millis(600)).await;
    assert_eq!(cc.get().await.unwrap().secret().expose_secret(), "t-3");
}

fn lifetime_of(
    body: String,
) -> impl std::future::Future<Output = Result<Duration, sturdy::core::Error>> {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, move |_| Reply::new(200, body.clone())));
    async move {
        let t = cc.get().await?;
        Ok(t.expires_at().expect("an expiry") - Instant::now())
    }
}

#[tokio::test(start_paused = true)]
async fn missing_expires_in_means_one_hour() {
    let d = lifetime_of(token_body("a", None)).await.unwrap();
    assert_eq!(d, Duration::from_secs(3600));
    let d = lifetime_of(token_body("a", Some("null"))).await;
    // `null` is as good as absent, or an error that names the field.
    match d {
        Ok(d) => assert_eq!(d, Duration::from_secs(3600)),
        Err(e) => assert!(e.to_string().contains("expires_in"), "{e}"),
    }
}

#[tokio::test(start_paused = true)]
async fn zero_negative_or_non_numeric_expires_in_is_a_clear_error_without_a_refresh_loop() {
    for bad in [
        "0",
        "-1",
        "-9223372036854775808",
        "-1e400",
        "\"soon\"",
        "true",
        "[]",
    ] {
        let seen = Seen::default();
        let cc = creds(endpoint(&seen, move |n| {
            Reply::new(200, token_body(&format!("t-{n}"), Some(bad)))
        }));
        let err = cc.get().await.expect_err(bad);
        let m = err.to_string();
        assert!(m.contains("expires"), "{bad}: cause not named: {m}");
        assert!(!m.contains(SECRET));
        for _ in 0..10 {
            let _ = cc.get().await;
        }
        assert_eq!(seen.calls(), 1, "{bad}: refresh loop");
    }
}

#[tokio::test(start_paused = true)]
async fn string_expires_in_holding_a_number() {
    // Some providers send "3600" as a string; the docs say a value that is not a number is an
    // error. Either way the caller must be told clearly.
    match lifetime_of(token_body("a", Some("\"3600\""))).await {
        Ok(d) => assert_eq!(d, Duration::from_secs(3600)),
        Err(e) => assert!(e.to_string().contains("expires_in"), "{e}"),
    }
}

#[tokio::test(start_paused = true)]
async fn huge_expires_in_is_clamped_to_24h() {
    for huge in [
        "86401",
        "1000000000000",
        "9223372036854775807",
        "18446744073709551616",
        "1e308",
        "1e400",
        "123456789012345678901234567890",
    ] {
        let d = lifetime_of(token_body("a", Some(huge)))
            .await
            .unwrap_or_else(|e| panic!("{huge}: {e}"));
        assert_eq!(d, Duration::from_secs(86_400), "{huge}");
    }
}

#[tokio::test(start_paused = true)]
async fn fractional_expires_in_is_a_lifetime() {
    let d = lifetime_of(token_body("a", Some("3600.9"))).await;
    match d {
        Ok(d) => assert!(d >= Duration::from_secs(3600) && d <= Duration::from_secs(3601)),
        Err(e) => assert!(e.to_string().contains("expires_in"), "{e}"),
    }
}

#[tokio::test(start_paused = true)]
async fn max_lifetime_of_duration_max_does_not_panic() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |_| {
        Reply::new(200, token_body("a", Some("1e400")))
    }))
    .with_max_lifetime(Duration::MAX)
    .with_skew(Duration::MAX)
    .with_default_lifetime(Duration::MAX);
    let t = cc.get().await.unwrap();
    let left = t.expires_at().unwrap() - Instant::now();
    assert!(left >= Duration::from_secs(86_400 * 365 * 10), "{left:?}");
    // And the source keeps working.
    cc.get().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn zero_lifetime_settings_are_at_least_one_second() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |_| Reply::new(200, token_body("a", None))))
        .with_default_lifetime(Duration::ZERO);
    let t = cc.get().await.unwrap();
    assert_eq!(
        t.expires_at().unwrap() - Instant::now(),
        Duration::from_secs(1)
    );
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |_| {
        Reply::new(200, token_body("a", Some("100")))
    }))
    .with_max_lifetime(Duration::ZERO);
    let t = cc.get().await.unwrap();
    assert_eq!(
        t.expires_at().unwrap() - Instant::now(),
        Duration::from_secs(1)
    );
}

#[tokio::test(start_paused = true)]
async fn non_json_token_body_is_an_error_that_says_so() {
    for body in ["<html>hello</html>", "", "{", "null", "[1,2]", "\"str\""] {
        let seen = Seen::default();
        let cc = creds(endpoint(&seen, move |_| Reply::new(200, body)));
        let err = cc.get().await.expect_err(body);
        let m = err.to_string();
        assert!(m.to_lowercase().contains("json"), "{body:?}: {m}");
        assert!(m.contains(TOKEN_URL), "{body:?}: endpoint not named: {m}");
    }
}

#[tokio::test(start_paused = true)]
async fn missing_or_empty_access_token_is_an_error_naming_the_field() {
    for body in [
        r#"{"token_type":"Bearer","expires_in":3600}"#,
        r#"{"access_token":"","token_type":"Bearer","expires_in":3600}"#,
        r#"{"access_token":42,"token_type":"Bearer","expires_in":3600}"#,
    ] {
        let seen = Seen::default();
        let cc = creds(endpoint(&seen, move |_| Reply::new(200, body)));
        match cc.get().await {
            Err(err) => assert!(err.to_string().contains("access_token"), "{body}: {err}"),
            Ok(t) => panic!("{body}: accepted token {:?}", t.secret().expose_secret()),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn token_body_over_64_kib_is_refused_and_named() {
    let seen = Seen::default();
    let pad = " ".repeat(70 * 1024);
    let cc = creds(endpoint(&seen, move |_| {
        Reply::new(
            200,
            format!(r#"{{"access_token":"a","token_type":"Bearer","expires_in":3600}}{pad}"#),
        )
    }));
    let err = cc.get().await.unwrap_err();
    let m = err.to_string().to_lowercase();
    assert!(
        m.contains("64") || m.contains("65536") || m.contains("large"),
        "cause not named: {m}"
    );
    // Just under the bound is fine.
    let seen = Seen::default();
    let pad = " ".repeat(60 * 1024);
    let cc = creds(endpoint(&seen, move |_| {
        Reply::new(200, format!("{pad}{}", token_body("a", Some("3600"))))
    }));
    cc.get().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn invalid_client_message_matches_the_guide_and_is_not_retryable() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |_| {
        Reply::new(401, r#"{"error":"invalid_client"}"#)
    }));
    let err = cc.get().await.unwrap_err();
    let m = err.to_string();
    assert!(
        m.starts_with(
            "the token endpoint https://auth.example.com/oauth/token refused the token request \
             with invalid_client (401 Unauthorized): the client id or secret is wrong"
        ),
        "{m}"
    );
    assert!(!err.is_retryable());
    assert_eq!(err.kind(), &ErrorKind::Auth);
}

#[tokio::test(start_paused = true)]
async fn invalid_scope_and_other_refusals_say_what_to_fix() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |_| {
        Reply::new(
            400,
            r#"{"error":"invalid_scope","error_description":"no such scope"}"#,
        )
    }))
    .with_scopes(["orders:write"]);
    let err = cc.get().await.unwrap_err();
    let m = err.to_string();
    assert!(m.contains("invalid_scope") && m.contains("scope"), "{m}");
    assert!(!err.is_retryable());
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |_| Reply::new(400, "Bad Request, go away")));
    let err = cc.get().await.unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn five_hundreds_429_and_408_from_the_token_endpoint_are_retryable() {
    for status in [500u16, 502, 503, 504, 429, 408] {
        let seen = Seen::default();
        let cc = creds(endpoint(&seen, move |_| {
            Reply::new(status, "<html>oops</html>")
        }));
        let err = cc.get().await.unwrap_err();
        assert!(err.is_retryable(), "{status}: {err}");
        let m = err.to_string();
        assert!(m.contains(TOKEN_URL), "{status}: {m}");
        assert!(m.contains(&status.to_string()), "{status}: {m}");
    }
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |_| Reply::new(503, "")));
    assert_eq!(
        cc.get().await.unwrap_err().kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE)
    );
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_echoing_the_secret_does_not_get_it_into_the_message() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |_| {
        Reply::new(
            401,
            format!(
                r#"{{"error":"invalid_client","error_description":"client_secret {SECRET} is wrong for my-client"}}"#
            ),
        )
    }));
    let err = cc.get().await.unwrap_err();
    let text = format!("{err} / {err:?}");
    assert!(!text.contains(SECRET), "{text}");
}

#[tokio::test(start_paused = true)]
async fn messages_name_the_token_url_without_user_info_or_query() {
    let seen = Seen::default();
    let cc = sturdy::auth::ClientCredentials::new(
        endpoint(&seen, |_| Reply::new(503, "")),
        "https://bob:pw-HIDDEN@auth.example.com:8443/oauth/token?api_key=q-HIDDEN#frag",
        "id",
        SECRET,
    );
    let cc = match cc {
        Ok(cc) => cc,
        // A fragment may be refused; the same without it.
        Err(_) => sturdy::auth::ClientCredentials::new(
            endpoint(&seen, |_| Reply::new(503, "")),
            "https://bob:pw-HIDDEN@auth.example.com:8443/oauth/token?api_key=q-HIDDEN",
            "id",
            SECRET,
        )
        .unwrap(),
    };
    let d = format!("{cc:?}");
    assert!(!d.contains("HIDDEN"), "{d}");
    let err = cc.get().await.unwrap_err();
    let text = format!("{err} / {err:?}");
    assert!(!text.contains("HIDDEN"), "{text}");
    assert!(
        text.contains("https://auth.example.com:8443/oauth/token"),
        "{text}"
    );
    let layer = AuthLayer::oauth2(cc);
    assert!(!format!("{layer:?}").contains("HIDDEN"));
}

#[tokio::test(start_paused = true)]
async fn a_silent_token_endpoint_fails_after_the_30s_request_timeout() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |_| Reply::never()));
    let start = Instant::now();
    let err = cc.get().await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(err.kind(), &ErrorKind::Timeout);
    assert!(err.is_retryable());
    assert!(err.to_string().contains(TOKEN_URL), "{err}");
    // Then it backs off: no new request at once.
    let _ = cc.get().await;
    assert_eq!(seen.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn request_timeout_zero_lets_only_an_immediate_answer_through() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| tok(n, 3600))).with_request_timeout(Duration::ZERO);
    cc.get().await.expect("an immediate answer passes");
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| {
        tok(n, 3600).after(Duration::from_millis(1))
    }))
    .with_request_timeout(Duration::ZERO);
    assert_eq!(cc.get().await.unwrap_err().kind(), &ErrorKind::Timeout);
}

#[tokio::test(start_paused = true)]
async fn token_wait_timeout_fails_the_call_with_the_guides_words_and_the_request_goes_on() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let cc = creds(endpoint(&ts, |n| {
        tok(n, 3600).after(Duration::from_secs(10))
    }));
    let svc = AuthLayer::oauth2(cc)
        .with_token_timeout(Duration::from_secs(2))
        .layer(api(&aps, |_, _| 200));
    let start = Instant::now();
    let err = svc.clone().oneshot(get("/a")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert!(e.is_retryable());
    assert!(
        e.to_string().starts_with(
            "no access token from the token endpoint https://auth.example.com/oauth/token \
             within 2s; the request was not sent"
        ),
        "{e}"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(e.cause_is_elsewhere());
    assert!(!ErrorSummary::of(&*err).may_have_been_processed);
    assert_eq!(aps.calls(), 0);
    advance(Duration::from_secs(9)).await;
    assert_eq!(svc.oneshot(get("/b")).await.unwrap().status(), 200);
    assert_eq!(ts.calls(), 1, "the token request did not go on");
}

#[tokio::test(start_paused = true)]
async fn token_timeout_zero_means_cached_token_or_fail_at_once() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let cc = creds(endpoint(&ts, |n| tok(n, 3600)));
    let svc = AuthLayer::oauth2(cc.clone())
        .with_token_timeout(Duration::ZERO)
        .layer(api(&aps, |_, _| 200));
    let err = svc.clone().oneshot(get("/a")).await.unwrap_err();
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout);
    settle().await;
    assert_eq!(svc.oneshot(get("/a")).await.unwrap().status(), 200);
    assert_eq!(ts.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_401_refreshes_once_and_replays_the_same_body() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let svc = AuthLayer::oauth2(creds(endpoint(&ts, |n| tok(n, 3600)))).layer(api(&aps, |_, a| {
        if a == "Bearer t-2" {
            200
        } else {
            401
        }
    }));
    let req = Request::post("http://api.example.com/orders")
        .header("content-type", "application/json")
        .body(Full::from(r#"{"item":"book"}"#))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(aps.auths(), ["Bearer t-1", "Bearer t-2"]);
    assert_eq!(aps.bodies(), [r#"{"item":"book"}"#, r#"{"item":"book"}"#]);
    assert_eq!(aps.headers()[1]["content-type"], "application/json");
    assert_eq!(ts.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_second_401_is_returned_as_is() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let svc =
        AuthLayer::oauth2(creds(endpoint(&ts, |n| tok(n, 3600)))).layer(api(&aps, |_, _| 401));
    let res = svc.oneshot(get("/a")).await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(aps.calls(), 2);
    assert_eq!(ts.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_api_refusing_every_token_does_not_hammer_the_token_endpoint() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let svc =
        AuthLayer::oauth2(creds(endpoint(&ts, |n| tok(n, 3600)))).layer(api(&aps, |_, _| 401));
    for _ in 0..10 {
        assert_eq!(svc.clone().oneshot(get("/a")).await.unwrap().status(), 401);
    }
    assert!(
        ts.calls() <= 11,
        "{} token requests for 10 calls",
        ts.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn a_403_is_not_retried_and_keeps_the_token() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let svc =
        AuthLayer::oauth2(creds(endpoint(&ts, |n| tok(n, 3600)))).layer(api(&aps, |_, _| 403));
    for _ in 0..3 {
        assert_eq!(svc.clone().oneshot(get("/a")).await.unwrap().status(), 403);
    }
    assert_eq!(aps.calls(), 3);
    assert_eq!(ts.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_replay_limit_is_sent_once_and_its_401_returned() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let svc = AuthLayer::oauth2(creds(endpoint(&ts, |n| tok(n, 3600))))
        .with_replay_limit(16)
        .layer(api(&aps, |_, a| if a == "Bearer t-2" { 200 } else { 401 }));
    let req = Request::post("http://api.example.com/o")
        .body(Full::from(vec![b'x'; 17]))
        .unwrap();
    assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 401);
    assert_eq!(aps.calls(), 1);
    // Exactly at the limit it is replayed.
    let req = Request::post("http://api.example.com/o")
        .body(Full::from(vec![b'y'; 16]))
        .unwrap();
    assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
    assert_eq!(aps.bodies().last().unwrap(), &"y".repeat(16));
}

#[tokio::test(start_paused = true)]
async fn default_replay_limit_is_one_mib() {
    for (len, replayed) in [(1024 * 1024, true), (1024 * 1024 + 1, false)] {
        let (ts, aps) = (Seen::default(), Seen::default());
        let svc = AuthLayer::oauth2(creds(endpoint(&ts, |n| tok(n, 3600))))
            .layer(api(&aps, |_, a| if a == "Bearer t-2" { 200 } else { 401 }));
        let req = Request::post("http://api.example.com/o")
            .body(Full::from(vec![b'z'; len]))
            .unwrap();
        let status = svc.oneshot(req).await.unwrap().status();
        assert_eq!(status == 200, replayed, "{len} bytes");
        assert_eq!(aps.calls(), if replayed { 2 } else { 1 });
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_token_wait_for_the_replay_may_have_been_processed() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let svc = AuthLayer::oauth2(creds(endpoint(&ts, |n| {
        if n == 1 {
            tok(n, 3600)
        } else {
            Reply::new(401, r#"{"error":"invalid_client"}"#)
        }
    })))
    .layer(api(&aps, |_, _| 401));
    let req = Request::post("http://api.example.com/pay")
        .body(Full::from("x"))
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert!(sturdy_err(&err).cause_is_elsewhere());
    assert!(ErrorSummary::of(&*err).may_have_been_processed);
}

#[tokio::test(start_paused = true)]
async fn events_report_fetches_failures_and_rejections() {
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let (e1, e2) = (events.clone(), events.clone());
    let (ts, aps) = (Seen::default(), Seen::default());
    let cc = creds(endpoint(&ts, |n| match n {
        1 => Reply::new(200, token_body("t-1", None)),
        2 => Reply::new(503, ""),
        _ => Reply::new(200, token_body("t-3", Some("999999999"))),
    }))
    .on_event(move |e| {
        let s = match e {
            Event::TokenFetched {
                endpoint, lifetime, ..
            } => {
                format!("fetched {endpoint} {}", lifetime.as_secs())
            }
            Event::TokenFailed {
                endpoint,
                error,
                retry_in,
                keeping_current,
                ..
            } => format!(
                "failed {endpoint} {error:?} {} {keeping_current}",
                retry_in.as_secs()
            ),
            other => format!("{other:?}"),
        };
        e1.lock().unwrap().push(s);
    });
    let svc = AuthLayer::oauth2(cc)
        .on_event(move |e| {
            if let Event::TokenRejected { host, .. } = e {
                e2.lock().unwrap().push(format!("rejected {host}"));
            }
        })
        .layer(api(&aps, |_, a| if a == "Bearer t-3" { 200 } else { 401 }));
    // t-1 refused: dropped, a fetch fails (503), then after the backoff t-3.
    let res = svc.clone().oneshot(get("/a")).await;
    assert!(res.is_err() || res.unwrap().status() != 200);
    advance(Duration::from_secs(2)).await;
    assert_eq!(svc.oneshot(get("/a")).await.unwrap().status(), 200);
    let ev = events.lock().unwrap().clone();
    assert_eq!(ev[0], "fetched auth.example.com 3600", "{ev:?}");
    assert_eq!(ev[1], "rejected api.example.com", "{ev:?}");
    assert!(
        ev[2].starts_with("failed auth.example.com Server(503) 1 false"),
        "{ev:?}"
    );
    assert!(
        ev.contains(&"fetched auth.example.com 86400".to_owned()),
        "{ev:?}"
    );
    let all = ev.join("\n");
    assert!(!all.contains("t-1") && !all.contains(SECRET), "{all}");
}

#[derive(Debug)]
struct Vault {
    fail: Option<BoxError>,
    describe: Option<&'static str>,
}

impl TokenSource for Vault {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        let r = match &self.fail {
            Some(e) => {
                let text = e.to_string();
                if let Some(s) = e.downcast_ref::<sturdy::core::Error>() {
                    Err(
                        Box::new(sturdy::core::Error::new(s.kind().clone(), s.message()))
                            as BoxError,
                    )
                } else {
                    Err(text.into())
                }
            }
            None => Ok(Token::new("v-1", None)),
        };
        Box::pin(async move { r })
    }
    fn invalidate(&self, _token: &Token) {}
    fn describe(&self) -> String {
        self.describe.unwrap_or("the token source").to_owned()
    }
}

#[tokio::test]
async fn a_custom_source_error_is_wrapped_with_its_description() {
    for (describe, want) in [
        (
            None,
            "could not get an access token from the token source: vault sealed",
        ),
        (
            Some("the vault at vault.internal"),
            "could not get an access token from the vault at vault.internal: vault sealed",
        ),
    ] {
        let aps = Seen::default();
        let src = Arc::new(Vault {
            fail: Some("vault sealed".into()),
            describe,
        });
        let svc = AuthLayer::token_source(src).layer(api(&aps, |_, _| 200));
        let err = svc.oneshot(get("/")).await.unwrap_err();
        let e = sturdy_err(&err);
        assert!(e.to_string().starts_with(want), "{e}");
        assert_eq!(delivery(&*err), Delivery::NotSent);
        assert_eq!(aps.calls(), 0);
    }
}

#[tokio::test]
async fn a_custom_source_sturdy_error_is_kept_as_it_is() {
    let aps = Seen::default();
    let src = Arc::new(Vault {
        fail: Some(Box::new(sturdy::core::Error::new(
            ErrorKind::Server(StatusCode::BAD_GATEWAY),
            "sidecar down",
        ))),
        describe: None,
    });
    let svc = AuthLayer::token_source(src).layer(api(&aps, |_, _| 200));
    let err = svc.oneshot(get("/")).await.unwrap_err();
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Server(StatusCode::BAD_GATEWAY));
    assert!(e.to_string().contains("sidecar down"), "{e}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
}

#[tokio::test]
async fn a_custom_source_with_no_expiry_is_used() {
    let aps = Seen::default();
    let src = Arc::new(Vault {
        fail: None,
        describe: None,
    });
    let svc = AuthLayer::token_source(src).layer(api(&aps, |_, _| 200));
    svc.oneshot(get("/")).await.unwrap();
    assert_eq!(aps.auths(), ["Bearer v-1"]);
}

#[tokio::test(start_paused = true)]
async fn clones_share_a_cache_but_a_setter_makes_a_new_one() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| tok(n, 3600)));
    cc.get().await.unwrap();
    let same = cc.clone();
    same.get().await.unwrap();
    assert_eq!(seen.calls(), 1);
    let other = cc.clone().with_scopes(["other:scope"]);
    assert_eq!(other.get().await.unwrap().secret().expose_secret(), "t-2");
    assert_eq!(seen.calls(), 2);
    assert_eq!(cc.get().await.unwrap().secret().expose_secret(), "t-1");
}

#[tokio::test(start_paused = true)]
async fn token_request_form_with_secret_basic_and_secret_post() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| tok(n, 3600)))
        .with_scopes(["orders:read", "orders:write"])
        .with_audience("https://api.example.com")
        .with_param("resource", "r1")
        .unwrap();
    cc.get().await.unwrap();
    let h = &seen.headers()[0];
    let expect = format!("Basic {}", b64(format!("my-client:{SECRET}").as_bytes()));
    assert_eq!(h["authorization"], expect.as_str());
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/x-www-form-urlencoded"));
    let body = &seen.bodies()[0];
    assert!(body.contains("grant_type=client_credentials"), "{body}");
    assert!(
        body.contains("scope=orders%3Aread+orders%3Awrite")
            || body.contains("scope=orders%3Aread%20orders%3Awrite"),
        "{body}"
    );
    assert!(
        body.contains("audience=https%3A%2F%2Fapi.example.com"),
        "{body}"
    );
    assert!(body.contains("resource=r1"), "{body}");
    assert!(
        !body.contains(SECRET),
        "secret in the body with Basic: {body}"
    );

    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| tok(n, 3600))).with_client_auth(ClientAuth::SecretPost);
    cc.get().await.unwrap();
    assert!(seen.headers()[0].get("authorization").is_none());
    let body = &seen.bodies()[0];
    assert!(body.contains("client_id=my-client"), "{body}");
    assert!(body.contains(&format!("client_secret={SECRET}")), "{body}");
}

fn b64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in input.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn lower_case_bearer_token_type_is_accepted() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |_| {
        Reply::new(
            200,
            r#"{"access_token":"a","token_type":"bearer","expires_in":60}"#,
        )
    }));
    cc.get().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_non_bearer_token_type_is_refused() {
    for tt in ["mac", "DPoP", "N_A"] {
        let seen = Seen::default();
        let cc = creds(endpoint(&seen, move |_| {
            Reply::new(
                200,
                format!(r#"{{"access_token":"a","token_type":"{tt}","expires_in":60}}"#),
            )
        }));
        let err = cc.get().await.expect_err(tt);
        assert!(
            err.to_string().contains(tt) && err.to_string().contains("Bearer"),
            "{tt}: {err}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_token_with_cr_lf_never_reaches_the_api_as_a_header() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let cc = creds(endpoint(&ts, |_| {
        Reply::new(
            200,
            r#"{"access_token":"tok-LEAKY\r\nX-Evil: 1","token_type":"Bearer","expires_in":60}"#,
        )
    }));
    let svc = AuthLayer::oauth2(cc).layer(api(&aps, |_, _| 200));
    let r = svc.oneshot(get("/")).await;
    assert_eq!(aps.calls(), 0, "sent with a broken header");
    let err = r.unwrap_err();
    let text = format!("{err} / {err:?}");
    assert!(!text.contains("LEAKY"), "{text}");
    let e = sturdy_err(&err);
    assert!(
        e.to_string().to_lowercase().contains("header"),
        "cause not named: {e}"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
}

#[tokio::test(start_paused = true)]
async fn the_auth_layer_keeps_readiness_with_a_service_kept_across_calls() {
    let (ts, aps) = (Seen::default(), Seen::default());
    let mut svc = AuthLayer::oauth2(creds(endpoint(&ts, |n| {
        tok(n, 3600).after(Duration::from_millis(50))
    })))
    .layer(api(&aps, |_, _| 200));
    for _ in 0..5 {
        let res = svc.ready().await.unwrap().call(get("/k")).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(ts.calls(), 1);
    let _ = Bytes::new();
}
