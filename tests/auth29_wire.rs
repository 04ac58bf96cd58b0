//! OAuth2 and the auth layer against real token endpoints and APIs on 127.0.0.1 (hyper-util
//! client, real time, millisecond settings): hostile bodies, stalls, refusals and log leaks.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::HeaderName;
use sturdy::auth::{AuthLayer, ClientCredentials, ExposeSecret};
use sturdy::core::classify::delivery;
use sturdy::core::{Delivery, ErrorKind};
use tower::{Layer, ServiceExt};

use crate::auth29_util::{hyper_client, serve, token_body, Logs, Seen, WireReply, SECRET};

async fn token_server(f: impl Fn(usize) -> WireReply + Send + Sync + 'static) -> (Seen, String) {
    let seen = Seen::default();
    let addr = serve(seen.clone(), Arc::new(move |n, _, _| f(n))).await;
    (seen, format!("http://{addr}/oauth/token"))
}

async fn api_server(
    f: impl Fn(usize, &str) -> WireReply + Send + Sync + 'static,
) -> (Seen, String) {
    let seen = Seen::default();
    let addr = serve(
        seen.clone(),
        Arc::new(move |n, parts: http::request::Parts, _| {
            let auth = parts
                .headers
                .get("authorization")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            f(n, &auth)
        }),
    )
    .await;
    (seen, format!("http://{addr}"))
}

fn cc(url: &str) -> ClientCredentials {
    ClientCredentials::new(hyper_client(), url, "my-client", SECRET).unwrap()
}

fn ok(n: usize, secs: u64) -> WireReply {
    WireReply::new(200, token_body(&format!("w-{n}"), Some(&secs.to_string())))
}

fn get(base: &str, path: &str) -> http::Request<http_body_util::Full<Bytes>> {
    http::Request::get(format!("{base}{path}"))
        .body(http_body_util::Full::default())
        .unwrap()
}

#[tokio::test]
async fn a_real_token_endpoint_and_api() {
    let (ts, url) = token_server(|n| ok(n, 3600)).await;
    let (aps, base) =
        api_server(|_, a| WireReply::new(if a == "Bearer w-1" { 200 } else { 401 }, "{}")).await;
    let svc = AuthLayer::oauth2(cc(&url)).layer(hyper_client());
    for _ in 0..3 {
        let res = svc.clone().oneshot(get(&base, "/orders")).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(ts.calls(), 1);
    assert_eq!(aps.calls(), 3);
    let body = &ts.bodies()[0];
    assert!(body.contains("grant_type=client_credentials"), "{body}");
}

#[tokio::test]
async fn a_401_after_a_fresh_token_refreshes_once_over_the_wire() {
    let (ts, url) = token_server(|n| ok(n, 3600)).await;
    let (aps, base) =
        api_server(|_, a| WireReply::new(if a == "Bearer w-2" { 200 } else { 401 }, "{}")).await;
    let svc = AuthLayer::oauth2(cc(&url)).layer(hyper_client());
    let req = http::Request::put(format!("{base}/o/1"))
        .body(http_body_util::Full::from("payload"))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(ts.calls(), 2);
    assert_eq!(aps.auths(), ["Bearer w-1", "Bearer w-2"]);
    assert_eq!(aps.bodies(), ["payload", "payload"]);
}

#[tokio::test]
async fn a_10_mb_token_body_is_refused_quickly_and_named() {
    let (_ts, url) = token_server(|_| {
        let mut body = token_body("big", Some("3600")).into_bytes();
        body.resize(10 * 1024 * 1024, b' ');
        WireReply::new(200, body)
    })
    .await;
    let start = Instant::now();
    let err = cc(&url).get().await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let m = err.to_string().to_lowercase();
    assert!(
        m.contains("64") || m.contains("large") || m.contains("65536"),
        "{m}"
    );
    assert!(m.contains("/oauth/token"), "{m}");
}

#[tokio::test]
async fn a_stalled_token_body_ends_at_the_request_timeout() {
    let (_ts, url) = token_server(|_| {
        let mut r = WireReply::new(200, Bytes::from_static(br#"{"access_token":"#));
        r.chunks.push((None, Bytes::from_static(b"\"x\"}")));
        r
    })
    .await;
    let start = Instant::now();
    let err = cc(&url)
        .with_request_timeout(Duration::from_millis(300))
        .get()
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(err.kind(), &ErrorKind::Timeout);
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_slow_dribbled_body_is_bounded_by_the_request_timeout_as_a_whole() {
    let (_ts, url) = token_server(|_| {
        let body = token_body("drip", Some("3600")).into_bytes();
        let mut r = WireReply::new(200, Bytes::new());
        r.chunks = body
            .chunks(4)
            .map(|c| (Some(Duration::from_millis(40)), Bytes::copy_from_slice(c)))
            .collect();
        r
    })
    .await;
    let start = Instant::now();
    let err = cc(&url)
        .with_request_timeout(Duration::from_millis(300))
        .get()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Timeout);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_silent_token_endpoint_ends_at_the_request_timeout() {
    // Accepts the connection, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            conns.push(s);
        }
    });
    let start = Instant::now();
    let err = cc(&format!("http://{addr}/oauth/token"))
        .with_request_timeout(Duration::from_millis(200))
        .get()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Timeout);
    assert!(start.elapsed() < Duration::from_secs(2));
    hold.abort();
}

#[tokio::test]
async fn a_refused_connection_is_a_retryable_connect_error_naming_the_endpoint() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}/oauth/token");
    let err = cc(&url).get().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Connect);
    assert!(err.is_retryable());
    let m = err.to_string();
    assert!(m.contains(&url), "{m}");
    assert!(m.to_lowercase().contains("refused"), "cause not named: {m}");
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_an_error() {
    let (_ts, url) = token_server(|_| {
        let mut r = WireReply::new(200, Bytes::from_static(br#"{"access_token":"x""#));
        r.headers.push(("content-length".into(), "500".into()));
        r
    })
    .await;
    let err = tokio::time::timeout(Duration::from_secs(5), cc(&url).get())
        .await
        .expect("hung on a short body")
        .unwrap_err();
    assert!(
        err.is_retryable() || err.kind() == &ErrorKind::Body,
        "{err:?}"
    );
}

#[tokio::test]
async fn html_from_a_proxy_is_an_error_that_says_json() {
    let (_ts, url) = token_server(|_| {
        let mut r = WireReply::new(200, "<html><body>Sign in</body></html>");
        r.headers = vec![("content-type".into(), "text/html".into())];
        r
    })
    .await;
    let err = cc(&url).get().await.unwrap_err();
    assert!(err.to_string().to_lowercase().contains("json"), "{err}");
    assert!(!err.is_retryable(), "{err}");
}

#[tokio::test]
async fn a_cr_lf_token_over_the_wire_is_refused_before_the_api() {
    let (_ts, url) = token_server(|_| {
        WireReply::new(
            200,
            r#"{"access_token":"w-EVIL\r\nX-Injected: yes","token_type":"Bearer","expires_in":60}"#,
        )
    })
    .await;
    let (aps, base) = api_server(|_, _| WireReply::new(200, "{}")).await;
    let svc = AuthLayer::oauth2(cc(&url)).layer(hyper_client());
    let err = svc.oneshot(get(&base, "/x")).await.unwrap_err();
    assert_eq!(aps.calls(), 0);
    assert!(!format!("{err} {err:?}").contains("EVIL"));
    assert_eq!(delivery(&*err), Delivery::NotSent);
}

#[tokio::test(flavor = "current_thread")]
async fn no_secret_in_any_log_line_error_or_debug_over_a_whole_session() {
    let logs = Logs::default();
    let _g = logs.capture();
    let (_ts, url) = token_server(|n| match n {
        1 => ok(n, 3600),
        2 => WireReply::new(
            401,
            format!(
                r#"{{"error":"invalid_client","error_description":"secret {SECRET} rejected"}}"#
            ),
        ),
        _ => ok(n, 3600),
    })
    .await;
    let (_aps, base) = api_server(|_, a| {
        let mut r = WireReply::new(401, "{}");
        r.headers.push((
            "www-authenticate".into(),
            format!(r#"Bearer error="invalid_token", error_description="token {a} expired""#),
        ));
        r
    })
    .await;
    let events = Arc::new(std::sync::Mutex::new(String::new()));
    let e = events.clone();
    let source = cc(&url).on_event(move |ev| e.lock().unwrap().push_str(&format!("{ev:?}\n")));
    let auth = AuthLayer::oauth2(source.clone());
    let svc = auth.clone().layer(hyper_client());
    let err = svc.clone().oneshot(get(&base, "/a")).await.unwrap_err();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = svc.clone().oneshot(get(&base, "/a")).await;
    // The response itself is not shown: the API above echoes the token into its challenge.
    let res = res.map(|r| r.status());
    let mut text = format!("{err} {err:?} {auth:?} {source:?} {svc:?} {res:?}");
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
    while let Some(e) = src {
        text.push_str(&format!(" {e} {e:?}"));
        src = e.source();
    }
    // A static key and a basic password over the wire too.
    let key_svc = AuthLayer::api_key(HeaderName::from_static("x-api-key"), "key-LEAKCHECK")
        .unwrap()
        .layer(hyper_client());
    let _ = key_svc.oneshot(get(&base, "/k")).await;
    let basic_svc = AuthLayer::basic("u", "pw-LEAKCHECK")
        .unwrap()
        .layer(hyper_client());
    let _ = basic_svc.oneshot(get(&base, "/b")).await;
    let all = format!("{}\n{}\n{}", logs.text(), events.lock().unwrap(), text);
    assert!(!logs.text().is_empty(), "nothing was logged at TRACE");
    for secret in [
        SECRET,
        "w-1",
        "w-2",
        "w-3",
        "LEAKCHECK",
        "bXktY2xpZW50OmNzLVNVUEVSU0VDUkVU",
        "dTpwdy1MRUFLQ0hFQ0s",
    ] {
        assert!(!all.contains(secret), "{secret} leaked in: {all}");
    }
}

#[tokio::test]
async fn the_token_from_the_wire_is_what_the_api_gets_and_debug_hides_it() {
    let (_ts, url) = token_server(|n| ok(n, 3600)).await;
    let source = cc(&url);
    let t = source.get().await.unwrap();
    assert_eq!(t.secret().expose_secret(), "w-1");
    assert!(!format!("{t:?} {source:?}").contains("w-1"));
}
