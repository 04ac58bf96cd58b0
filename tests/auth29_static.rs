//! Static credentials and configuration of `sturdy::auth` against what its docs promise.

use std::time::Duration;

use http::header::HeaderName;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials, ExposeSecret, SecretString, Token};
use sturdy::core::ErrorKind;
use tower::{Layer, ServiceExt};

use crate::auth29_util::{api, creds, endpoint, get, tok, Seen, SECRET, TOKEN_URL};

const KEY: &str = "key-TOPSECRET-42";

#[tokio::test]
async fn bearer_header_is_sent_and_marked_sensitive() {
    let seen = Seen::default();
    let svc = AuthLayer::bearer(KEY)
        .unwrap()
        .layer(api(&seen, |_, _| 200));
    let res = svc.oneshot(get("/x")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let h = &seen.headers()[0];
    assert_eq!(h["authorization"], format!("Bearer {KEY}").as_str());
    assert!(h["authorization"].is_sensitive());
    assert!(!format!("{h:?}").contains(KEY));
}

#[tokio::test]
async fn api_key_header_is_sent_and_marked_sensitive() {
    let seen = Seen::default();
    let layer = AuthLayer::api_key(HeaderName::from_static("x-api-key"), KEY).unwrap();
    let svc = layer.layer(api(&seen, |_, _| 200));
    svc.oneshot(get("/x")).await.unwrap();
    let h = &seen.headers()[0];
    assert_eq!(h["x-api-key"], KEY);
    assert!(h["x-api-key"].is_sensitive());
}

#[tokio::test]
async fn basic_header_is_base64_of_user_colon_password_and_sensitive() {
    let seen = Seen::default();
    let svc = AuthLayer::basic("alice", "pa ss:wörd")
        .unwrap()
        .layer(api(&seen, |_, _| 200));
    svc.oneshot(get("/x")).await.unwrap();
    let h = &seen.headers()[0];
    // base64("alice:pa ss:wörd")
    assert_eq!(h["authorization"], "Basic YWxpY2U6cGEgc3M6d8O2cmQ=");
    assert!(h["authorization"].is_sensitive());
}

#[test]
fn basic_user_with_colon_is_a_config_error_without_the_password() {
    let err = AuthLayer::basic("al:ice", KEY).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Config);
    let text = format!("{err} {err:?}");
    assert!(!text.contains(KEY), "{text}");
    assert!(
        text.contains(':') || text.to_lowercase().contains("colon"),
        "{text}"
    );
}

#[test]
fn bearer_with_cr_lf_is_a_config_error_that_does_not_quote_the_token() {
    for bad in ["abc\r\nX-Evil: 1", "abc\ndef", "abc\0def", "abc\x7fdef"] {
        let secret = format!("{KEY}{bad}");
        let err = AuthLayer::bearer(secret.as_str()).unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config, "{bad:?}");
        let text = format!("{err} / {err:?}");
        assert!(!text.contains(KEY), "the error quotes the secret: {text}");
        assert!(
            text.to_lowercase().contains("header"),
            "cause not named: {text}"
        );
    }
}

#[test]
fn api_key_with_invalid_header_bytes_is_a_config_error_that_does_not_quote_it() {
    for bad in ["\r\n", "\n", "\u{0}", "x\u{7f}"] {
        let secret = format!("{KEY}{bad}");
        let err =
            AuthLayer::api_key(HeaderName::from_static("x-api-key"), secret.as_str()).unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config);
        let text = format!("{err} / {err:?}");
        assert!(!text.contains(KEY), "{text}");
    }
}

#[test]
fn empty_bearer_token_is_refused_when_built() {
    assert!(AuthLayer::bearer("").is_err());
    assert!(AuthLayer::api_key(HeaderName::from_static("x-api-key"), "").is_err());
}

#[test]
fn api_key_query_with_empty_name_is_a_config_error() {
    let err = AuthLayer::api_key_query("", KEY).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Config);
    assert!(!format!("{err}{err:?}").contains(KEY));
    assert!(err.to_string().contains("empty"), "{err}");
}

#[tokio::test]
async fn api_key_query_keeps_the_callers_query_byte_for_byte_and_encodes_the_key() {
    let seen = Seen::default();
    let svc = AuthLayer::api_key_query("api_key", "a&b=c d/é")
        .unwrap()
        .layer(api(&seen, |_, _| 200));
    let req = Request::get("http://api.example.com/p?b=%2F&a=1&x=%7E+y")
        .body(Full::default())
        .unwrap();
    svc.oneshot(req).await.unwrap();
    let uri = &seen.uris()[0];
    assert!(
        uri.starts_with("http://api.example.com/p?b=%2F&a=1&x=%7E+y&"),
        "caller's query changed: {uri}"
    );
    let added = uri.rsplit('&').next().unwrap();
    let pairs: Vec<(String, String)> = form_pairs(added);
    assert_eq!(
        pairs,
        [("api_key".to_owned(), "a&b=c d/é".to_owned())],
        "{uri}"
    );
}

fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (dec(k), dec(v))
        })
        .collect()
}

fn dec(s: &str) -> String {
    let s = s.replace('+', " ");
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let h = u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap();
            out.push(h);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn api_key_query_on_a_uri_without_query_adds_one() {
    let seen = Seen::default();
    let svc = AuthLayer::api_key_query("k", "v1")
        .unwrap()
        .layer(api(&seen, |_, _| 200));
    svc.oneshot(get("/items")).await.unwrap();
    assert_eq!(seen.uris()[0], "http://api.example.com/items?k=v1");
}

#[test]
fn debug_of_every_static_layer_hides_the_secret() {
    let layers = [
        AuthLayer::bearer(KEY).unwrap(),
        AuthLayer::api_key(HeaderName::from_static("x-api-key"), KEY).unwrap(),
        AuthLayer::api_key_query("api_key", KEY).unwrap(),
        AuthLayer::basic("user", KEY).unwrap(),
    ];
    for l in layers {
        let d = format!("{l:?} {l:#?}");
        assert!(!d.contains(KEY), "{d}");
        let svc = l.layer(tower::service_fn(|_r: Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        }));
        let d = format!("{svc:?}");
        assert!(!d.contains(KEY), "{d}");
    }
}

#[test]
fn debug_of_client_credentials_and_oauth_layer_hides_the_secret() {
    let seen = Seen::default();
    let cc = creds(endpoint(&seen, |n| tok(n, 3600)))
        .with_scopes(["a:b"])
        .with_audience("aud");
    let d = format!("{cc:?} {cc:#?}");
    assert!(!d.contains(SECRET), "{d}");
    let layer = AuthLayer::oauth2(cc);
    let d = format!("{layer:?}");
    assert!(!d.contains(SECRET), "{d}");
}

#[test]
fn token_debug_shows_no_part_of_the_token() {
    let t = Token::new("tok-VERYSECRET", None);
    let d = format!("{t:?} {t:#?}");
    assert!(!d.contains("VERYSECRET") && !d.contains("tok-"), "{d}");
    assert_eq!(t.secret().expose_secret(), "tok-VERYSECRET");
    assert!(t.same_value(&Token::new(SecretString::from("tok-VERYSECRET"), None)));
    assert!(!t.same_value(&Token::new("other", None)));
}

#[test]
fn default_token_timeout_is_30s_and_reads_back() {
    let seen = Seen::default();
    let layer = AuthLayer::oauth2(creds(endpoint(&seen, |n| tok(n, 3600))));
    assert_eq!(layer.token_timeout(), Duration::from_secs(30));
    let layer = layer.with_token_timeout(Duration::from_millis(1500));
    assert_eq!(layer.token_timeout(), Duration::from_millis(1500));
    assert_eq!(
        AuthLayer::bearer("x").unwrap().token_timeout(),
        Duration::from_secs(30)
    );
}

#[test]
fn client_credentials_refuse_an_invalid_token_url() {
    let seen = Seen::default();
    for url in ["not a url", "", "/relative/path", "http://"] {
        let r = ClientCredentials::new(endpoint(&seen, |n| tok(n, 1)), url, "id", SECRET);
        let err = r.expect_err(url);
        assert_eq!(err.kind(), &ErrorKind::Config, "{url}");
        assert!(!format!("{err}{err:?}").contains(SECRET));
    }
}

#[test]
fn with_param_refuses_reserved_and_empty_names() {
    let seen = Seen::default();
    for name in ["grant_type", "scope", "client_id", "client_secret", ""] {
        let r = creds(endpoint(&seen, |n| tok(n, 1))).with_param(name, "v");
        let err = r.expect_err(name);
        assert_eq!(err.kind(), &ErrorKind::Config, "{name}");
        if !name.is_empty() {
            assert!(err.to_string().contains(name), "cause not named: {err}");
        }
    }
    assert!(creds(endpoint(&seen, |n| tok(n, 1)))
        .with_param("resource", "https://api")
        .is_ok());
}

#[tokio::test]
async fn static_credentials_ignore_the_token_timeout() {
    let seen = Seen::default();
    let svc = AuthLayer::bearer(KEY)
        .unwrap()
        .with_token_timeout(Duration::ZERO)
        .layer(api(&seen, |_, _| 200));
    assert_eq!(svc.oneshot(get("/")).await.unwrap().status(), 200);
}

#[tokio::test]
async fn static_401_and_403_are_returned_as_they_are() {
    for status in [401u16, 403] {
        let seen = Seen::default();
        let svc = AuthLayer::bearer(KEY)
            .unwrap()
            .layer(api(&seen, move |_, _| status));
        let res = svc.oneshot(get("/")).await.unwrap();
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(seen.calls(), 1);
    }
}

#[test]
fn secrecy_reexports_are_usable() {
    let s: sturdy::auth::secrecy::SecretString = SecretString::from("abc");
    assert_eq!(s.expose_secret(), "abc");
    assert!(!format!("{s:?}").contains("abc"));
    let _ = TOKEN_URL;
}
