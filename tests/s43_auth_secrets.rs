//! Secrets per docs/guides/auth.md ("Secrets live in `secrecy` types; headers are marked
//! sensitive; no `Debug` or log line shows them", "Messages name the token URL without its user
//! info or query") and the static constructors' `Config` errors, with a `tracing` subscriber
//! that captures every event at every level.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials, ExposeSecret};
use sturdy::core::ErrorKind;
use tower::{ServiceBuilder, ServiceExt};

use crate::s43_util::{
    base64, chain, get, status_json, token_json, Answer, Api, Endpoint, Logs, SECRET,
};

const API: &str = "https://api.example.com/v1/orders?page=2";

/// A static layer over an API that hands back the request it got.
async fn sent(layer: AuthLayer, uri: &str) -> Request<Full<Bytes>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| {
        tx.send(req).unwrap();
        async { Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default())) }
    });
    let svc = ServiceBuilder::new().layer(layer).service(api);
    svc.oneshot(get(uri)).await.unwrap();
    rx.recv().unwrap()
}

#[tokio::test]
async fn static_credentials_are_sensitive_headers_and_never_in_debug() {
    let key = "k3y-Value-42";
    let layers = [
        (
            AuthLayer::bearer(key).unwrap(),
            "authorization",
            format!("Bearer {key}"),
        ),
        (
            AuthLayer::api_key(HeaderName::from_static("x-api-key"), key).unwrap(),
            "x-api-key",
            key.to_owned(),
        ),
        (
            AuthLayer::basic("user", key).unwrap(),
            "authorization",
            format!("Basic {}", base64(format!("user:{key}").as_bytes())),
        ),
    ];
    for (layer, header, value) in layers {
        let dbg = format!("{layer:?}");
        assert!(!dbg.contains(key), "{dbg}");
        let req = sent(layer, API).await;
        let h = &req.headers()[header];
        assert_eq!(h, value.as_str());
        assert!(h.is_sensitive(), "{header} not sensitive");
        assert!(!format!("{:?}", req.headers()).contains(key));
    }
}

#[tokio::test]
async fn the_query_key_replaces_the_callers_own_in_any_encoding_and_keeps_the_rest() {
    let layer = AuthLayer::api_key_query("api_key", "k3y").unwrap();
    assert!(!format!("{layer:?}").contains("k3y"));
    let req = sent(
        layer,
        "https://api.example.com/x?a=1&api_key=mine&b=%2F%20+&api%5Fkey=other&c",
    )
    .await;
    let q = req.uri().query().unwrap();
    assert_eq!(
        q.matches("api_key=").count() + q.matches("api%5Fkey").count(),
        1,
        "{q}"
    );
    assert!(q.contains("api_key=k3y"), "{q}");
    assert!(q.starts_with("a=1&b=%2F%20+&c"), "{q}");
}

#[test]
fn empty_and_unfit_credentials_are_config_errors_that_do_not_echo_the_secret() {
    let name = || HeaderName::from_static("x-api-key");
    let errs = [
        AuthLayer::bearer("").map(|_| ()),
        AuthLayer::bearer(" \t ").map(|_| ()),
        AuthLayer::bearer("s3cr3t-\n-part").map(|_| ()),
        AuthLayer::api_key(name(), "").map(|_| ()),
        AuthLayer::api_key(name(), "\t").map(|_| ()),
        AuthLayer::api_key(name(), "s3cr3t-\u{7f}-part").map(|_| ()),
        AuthLayer::api_key_query("", "s3cr3t-part").map(|_| ()),
        AuthLayer::api_key_query("key", "  ").map(|_| ()),
        AuthLayer::basic("us:er", "s3cr3t-part").map(|_| ()),
    ];
    for (i, r) in errs.into_iter().enumerate() {
        let e = r.expect_err(&format!("case {i} was accepted"));
        assert_eq!(*e.kind(), ErrorKind::Config, "case {i}: {e}");
        let text = chain(&e);
        assert!(!text.contains("s3cr3t"), "case {i}: {text}");
    }
    // A Basic password may be empty.
    assert!(AuthLayer::basic("key-as-user", "").is_ok());
}

#[test]
fn secrecy_and_its_types_are_reexported() {
    let s: sturdy::auth::SecretString = "abc".into();
    let t: sturdy::auth::secrecy::SecretString = "abc".into();
    assert_eq!(t.expose_secret(), "abc");
    assert!(!format!("{s:?}").contains("abc"));
}

const LEAKY_URL: &str = "https://robot:pa55word@auth.example.com:8443/oauth/token?api_key=qs3cret";
const SHOWN_URL: &str = "https://auth.example.com:8443/oauth/token";

fn leaky_source(ep: &Endpoint) -> ClientCredentials {
    ClientCredentials::new(ep.client(), LEAKY_URL, "my-client", SECRET)
        .unwrap()
        .with_request_timeout(Duration::from_secs(5))
}

fn assert_clean(what: &str, text: &str) {
    let basic = base64(format!("my-client:{SECRET}").as_bytes());
    for needle in [
        SECRET,
        "pa55word",
        "qs3cret",
        "t-Secret-Token",
        basic.as_str(),
    ] {
        assert!(!text.contains(needle), "{what} shows {needle}: {text}");
    }
}

#[tokio::test(start_paused = true)]
async fn no_secret_in_any_log_line_debug_or_message_across_a_sources_life() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let basic = base64(format!("my-client:{SECRET}").as_bytes());
    let echo = format!(
        r#"{{"error":"invalid_client","error_description":"got {SECRET} and Basic {basic}"}}"#
    );
    let ep = Endpoint::new(token_json("t-Secret-Token-2", Some("1e30")));
    ep.then(status_json(401, &echo))
        .then(status_json(500, &echo))
        .then(Answer::Stall)
        .then(token_json("t-Secret-Token-1", Some("3600")));
    let src = leaky_source(&ep);
    assert_clean("Debug of the source", &format!("{src:?}"));
    let layer = AuthLayer::oauth2(src.clone()).with_token_timeout(Duration::from_secs(60));
    assert_clean("Debug of the layer", &format!("{layer:?}"));
    let api = Api::default();
    api.statuses.lock().unwrap().extend([401]);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::util::BoxCloneSyncService::new(api.service()));
    assert_clean("Debug of the service", &format!("{svc:?}"));

    let mut messages = Vec::new();
    for _ in 0..3 {
        let err = svc.clone().oneshot(get(API)).await.unwrap_err();
        messages.push(chain(&*err));
        // Past the backoff.
        tokio::time::sleep(Duration::from_secs(70)).await;
    }
    assert!(messages[0].contains(SHOWN_URL), "{}", messages[0]);
    assert!(messages[0].contains("[redacted]"), "{}", messages[0]);
    // Then a token, a 401 from the API and a replay with a fresh token.
    let res = svc.clone().oneshot(get(API)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let token = src.get().await.unwrap();
    assert_clean("Debug of a token", &format!("{token:?}"));
    assert_eq!(token.secret().expose_secret(), "t-Secret-Token-2");
    for (i, m) in messages.iter().enumerate() {
        assert_clean(&format!("error {i}"), m);
    }
    let text = logs.text();
    assert!(!text.is_empty(), "no log line captured");
    assert_clean("the logs", &text);
    drop(_guard);
}

#[tokio::test(start_paused = true)]
async fn a_token_timeout_message_names_the_url_without_userinfo_or_query() {
    let ep = Endpoint::new(Answer::Stall);
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(leaky_source(&ep)).with_token_timeout(Duration::from_secs(1)))
        .service(Api::default().service());
    let err = svc.oneshot(get(API)).await.unwrap_err();
    let text = chain(&*err);
    assert!(text.contains(SHOWN_URL), "{text}");
    assert_clean("the message", &text);
}

#[tokio::test(start_paused = true)]
async fn the_secret_goes_in_basic_by_default_and_in_the_body_only_with_secret_post() {
    let ep = Endpoint::new(token_json("t", Some("3600")));
    let src = ClientCredentials::new(
        ep.client(),
        crate::s43_util::TOKEN_URL,
        "my id",
        "p&ss word",
    )
    .unwrap();
    src.get().await.unwrap();
    let body = ep.bodies.lock().unwrap()[0].clone();
    assert!(!body.contains("client_secret"), "{body}");
    assert_eq!(body, "grant_type=client_credentials");
    // RFC 6749 2.3.1: id and secret form-encoded, then base64.
    let auth = ep.auths.lock().unwrap()[0].clone();
    assert_eq!(auth, format!("Basic {}", base64(b"my+id:p%26ss+word")));
}

#[tokio::test(start_paused = true)]
async fn a_server_echo_of_the_token_urls_userinfo_and_query_stays_out_of_the_message() {
    let echo = format!(
        r#"{{"error":"invalid_request","error_description":"bad request to {LEAKY_URL}"}}"#
    );
    let ep = Endpoint::new(status_json(400, &echo));
    let err = leaky_source(&ep).get().await.map(|_| ()).unwrap_err();
    assert_clean("the message", &chain(&err));
}
