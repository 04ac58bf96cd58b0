//! docs/guides/auth.md, read literally: what `bearer`, `api_key`, `api_key_query` and `basic`
//! refuse when built, `with_param`'s reserved names, the token timeout's default and read-back,
//! 403 returned as is, no secret in `Debug`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::core::ErrorKind;
use tower::{service_fn, BoxError, Layer, ServiceExt};

const SECRET: &str = "w30-s3cr3t-value";

/// auth.md:64-67: "an empty token or API key (or one of only spaces and tabs: an unset
/// variable, say) ... is a `Config` error when the layer is built", for each static source.
#[test]
fn blank_secrets_are_config_errors_for_every_static_source() {
    for blank in ["", " ", "\t", " \t  \t"] {
        let errs = [
            ("bearer", AuthLayer::bearer(blank).err()),
            (
                "api_key",
                AuthLayer::api_key(HeaderName::from_static("x-api-key"), blank).err(),
            ),
            (
                "api_key_query",
                AuthLayer::api_key_query("key", blank).err(),
            ),
        ];
        for (name, err) in errs {
            let err = err.unwrap_or_else(|| panic!("{name}({blank:?}) was accepted"));
            assert_eq!(err.kind(), &ErrorKind::Config, "{name}({blank:?})");
            assert!(!err.is_retryable(), "{name}");
        }
    }
}

/// auth.md:66-67: "an empty query parameter name or a Basic user name with `:` is a `Config`
/// error ... (a Basic password may be empty: some APIs take the key as the user name)".
#[tokio::test]
async fn basic_refuses_a_colon_in_the_user_and_takes_an_empty_password() {
    let err = AuthLayer::basic("us:er", SECRET).expect_err("refused");
    assert_eq!(err.kind(), &ErrorKind::Config);
    assert!(!format!("{err} {err:?}").contains(SECRET));
    let err = AuthLayer::api_key_query("", SECRET).expect_err("refused");
    assert_eq!(err.kind(), &ErrorKind::Config);

    let seen: Arc<Mutex<Option<String>>> = Arc::default();
    let s = seen.clone();
    let api = service_fn(move |req: Request<Full<Bytes>>| {
        *s.lock().unwrap() = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        async { Ok::<_, BoxError>(Response::new(Full::<Bytes>::default())) }
    });
    let svc = AuthLayer::basic("sk_live_key", "").unwrap().layer(api);
    svc.oneshot(Request::get("http://h/").body(Full::default()).unwrap())
        .await
        .unwrap();
    // base64("sk_live_key:")
    assert_eq!(
        seen.lock().unwrap().as_deref(),
        Some("Basic c2tfbGl2ZV9rZXk6")
    );
}

/// auth.md:63-70: "headers are marked sensitive; no `Debug` or log line shows them".
#[tokio::test]
async fn static_headers_are_sensitive_and_debug_hides_them() {
    let layers = [
        AuthLayer::bearer(SECRET).unwrap(),
        AuthLayer::api_key(HeaderName::from_static("x-api-key"), SECRET).unwrap(),
        AuthLayer::api_key_query("k", SECRET).unwrap(),
        AuthLayer::basic("user", SECRET).unwrap(),
    ];
    for layer in layers {
        let text = format!("{layer:?}");
        assert!(!text.contains(SECRET), "{text}");
        let sensitive = Arc::new(AtomicUsize::new(0));
        let s = sensitive.clone();
        let api = service_fn(move |req: Request<Full<Bytes>>| {
            for name in ["authorization", "x-api-key"] {
                if let Some(v) = req.headers().get(name) {
                    if v.is_sensitive() {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            async { Ok::<_, BoxError>(Response::new(Full::<Bytes>::default())) }
        });
        let svc = layer.clone().layer(api);
        let text = format!("{svc:?}");
        assert!(!text.contains(SECRET), "{text}");
        svc.oneshot(Request::get("http://h/").body(Full::default()).unwrap())
            .await
            .unwrap();
        let is_query = text.contains("Query") || format!("{layer:?}").contains("Query");
        if !is_query {
            assert_eq!(sensitive.load(Ordering::SeqCst), 1, "{layer:?}");
        }
    }
}

/// auth.md:73-74: "`.with_param(name, value)` (a `Result`: `grant_type`, `scope`, `client_id`
/// and `client_secret` are set by the source itself)".
#[test]
fn with_param_refuses_the_names_the_source_sets() {
    let http = sturdy_chaos::http_client();
    let tokens =
        ClientCredentials::new(http, "http://127.0.0.1:9/oauth/token", "id", SECRET).unwrap();
    for name in ["grant_type", "scope", "client_id", "client_secret"] {
        let err = tokens
            .clone()
            .with_param(name, "x")
            .err()
            .unwrap_or_else(|| panic!("{name} accepted"));
        assert_eq!(err.kind(), &ErrorKind::Config, "{name}");
        assert!(err.to_string().contains(name), "{err}");
    }
    assert!(tokens.with_param("resource", "https://api").is_ok());
}

/// auth.md:94-100: `with_token_timeout(d)` \[30 s\], read back with `token_timeout()`.
#[test]
fn token_timeout_defaults_to_thirty_seconds_and_reads_back() {
    let layer = AuthLayer::bearer("t").unwrap();
    assert_eq!(layer.token_timeout(), Duration::from_secs(30));
    let layer = layer.with_token_timeout(Duration::from_millis(250));
    assert_eq!(layer.token_timeout(), Duration::from_millis(250));
}

/// auth.md:89-90: "403 is returned as is" (no refresh, no replay).
#[tokio::test]
async fn a_403_is_returned_as_is_and_not_replayed() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            let mut res = Response::new(Full::<Bytes>::from("forbidden"));
            *res.status_mut() = StatusCode::FORBIDDEN;
            Ok::<_, BoxError>(res)
        }
    });
    let svc = AuthLayer::bearer(SECRET).unwrap().layer(api);
    let res = svc
        .oneshot(Request::get("http://h/").body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
