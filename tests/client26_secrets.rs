//! The client secret and access tokens in the words of token errors and logs, where the token
//! endpoint's body is quoted and cut short: auth.md "no `Debug` or log line shows them", the
//! auth crate's "no `Debug` output or `tracing` event shows a secret". A secret placed at every
//! offset of the body, so that it straddles wherever the quote is cut; a secret in JSON-escaped
//! form; a token in a malformed success body.
#![cfg(feature = "full")]

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::ClientCredentials;
use sturdy::core::BoxError;

use crate::logs13_common::{whole, Capture};

const SECRET: &str = "Qv7sK2mZp9XwR4tY8nB3";

/// A source whose endpoint answers every request with `status`, `ctype` and `body`.
fn source(status: u16, ctype: &'static str, body: String, secret: &str) -> ClientCredentials {
    let body = Arc::new(body);
    let endpoint = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let body = body.clone();
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .header("content-type", ctype)
                    .body(Full::<Bytes>::from((*body).clone()))
                    .unwrap(),
            )
        }
    });
    ClientCredentials::new(
        endpoint,
        "https://auth.test/oauth/token",
        "client-1",
        secret,
    )
    .unwrap()
}

/// Every run of `n` characters of `s`.
fn pieces(s: &str, n: usize) -> Vec<String> {
    let c: Vec<char> = s.chars().collect();
    (0..=c.len().saturating_sub(n))
        .map(|i| c[i..i + n].iter().collect())
        .collect()
}

/// The first piece of `secret` (8 characters or more) shown in `text`.
fn shown(text: &str, secret: &str) -> Option<String> {
    pieces(secret, 8)
        .into_iter()
        .find(|p| text.contains(p.as_str()))
}

async fn error_words(c: &ClientCredentials) -> String {
    let err = c.get().await.expect_err("the endpoint refuses");
    whole(&err)
}

/// A refusal whose plain-text body repeats the secret after `pad` characters: no part of the
/// secret is shown, wherever the quote of the body is cut.
#[tokio::test(flavor = "current_thread")]
async fn client26_echoed_secret_at_every_offset_of_a_text_body() {
    let mut leaks = Vec::new();
    for pad in (0..1200).chain((1200..70_000).step_by(997)) {
        let body = format!("{}client_secret={SECRET}&grant_type=x", "a".repeat(pad));
        let c = source(400, "text/plain", body, SECRET);
        let words = error_words(&c).await;
        if let Some(p) = shown(&words, SECRET) {
            leaks.push((pad, p, words.chars().take(300).collect::<String>()));
        }
    }
    assert!(
        leaks.is_empty(),
        "{} leaks, first: {:?}",
        leaks.len(),
        leaks.first()
    );
}

/// The same with a JSON error whose description repeats the secret.
#[tokio::test(flavor = "current_thread")]
async fn client26_echoed_secret_at_every_offset_of_an_error_description() {
    let mut leaks = Vec::new();
    for pad in 0..1200 {
        let body = format!(
            r#"{{"error":"invalid_client","error_description":"{}bad secret {SECRET} given"}}"#,
            "a".repeat(pad)
        );
        let c = source(401, "application/json", body, SECRET);
        let words = error_words(&c).await;
        if let Some(p) = shown(&words, SECRET) {
            leaks.push((pad, p));
        }
    }
    assert!(
        leaks.is_empty(),
        "{} leaks, first: {:?}",
        leaks.len(),
        leaks.first()
    );
}

/// A secret with characters JSON escapes (`/`, `"`, non-ASCII), repeated by an endpoint in a
/// JSON body of its own shape (no `error` member), escaped as JSON writes it.
#[tokio::test(flavor = "current_thread")]
async fn client26_json_escaped_secret_in_a_nonstandard_error_body() {
    let secret = "Zq9Lpa8ss+wo/rd\"Kx7Wm4é-Rt5Uy6";
    let escaped = serde_json::to_string(secret).unwrap();
    let escaped_slash = escaped.replace('/', "\\/");
    let mut found = Vec::new();
    for (ctype, status, body) in [
        (
            "application/json",
            400,
            format!(r#"{{"message":"rejected credentials","client_secret":{escaped}}}"#),
        ),
        (
            "application/json",
            401,
            format!(r#"{{"detail":{{"sent":{escaped_slash}}}}}"#),
        ),
        (
            "application/json",
            500,
            format!(r#"{{"trace":"client_secret={escaped_slash}"}}"#),
        ),
    ] {
        let c = source(status, ctype, body.clone(), secret);
        let words = error_words(&c).await;
        for form in [secret.to_string(), escaped.clone(), escaped_slash.clone()] {
            if let Some(p) = shown(&words, &form) {
                found.push(format!("{body} -> {p:?} in {words}"));
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

/// A success status with a token but a lifetime that is not a number: the error names the
/// problem, and shows no part of the token, wherever the body is cut.
#[tokio::test(flavor = "current_thread")]
async fn client26_token_in_a_malformed_success_body_at_every_offset() {
    let token = "eyJhbGciOiJSUzI1NiJ9.TOKENPAYLOADxyz123.SIGNATUREabc987";
    let mut leaks = Vec::new();
    for pad in (0..600).step_by(3) {
        for tail in [
            r#""expires_in":"soon""#,
            r#""expires_in":0"#,
            r#""expires_in":-5"#,
            r#""token_type":42"#,
        ] {
            let body = format!(
                r#"{{"note":"{}","access_token":"{token}","token_type":"Bearer",{tail}}}"#,
                "a".repeat(pad)
            );
            let c = source(200, "application/json", body, SECRET);
            let Err(err) = c.get().await else { continue };
            let words = whole(&err);
            if let Some(p) = shown(&words, token) {
                leaks.push((pad, tail, p));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "{} leaks, first: {:?}",
        leaks.len(),
        leaks.first()
    );
}

/// The same bodies, with every `tracing` event of sturdy's crates captured: no log line shows
/// any part of the secret or of the token.
#[tokio::test(flavor = "current_thread")]
async fn client26_no_secret_or_token_piece_in_logs() {
    let cap = Capture::default();
    let _g = cap.install();
    let token = "eyJhbGciOiJSUzI1NiJ9.TOKENPAYLOADxyz123.SIGNATUREabc987";
    for pad in (0..700).step_by(7) {
        let a = "a".repeat(pad);
        let _ = source(400, "text/plain", format!("{a}{SECRET}"), SECRET)
            .get()
            .await;
        let _ = source(
            200,
            "application/json",
            format!(r#"{{"n":"{a}","access_token":"{token}","expires_in":"x"}}"#),
            SECRET,
        )
        .get()
        .await;
        let _ = source(
            401,
            "application/json",
            format!(r#"{{"error":"invalid_client","error_description":"{a}{SECRET}"}}"#),
            SECRET,
        )
        .get()
        .await;
    }
    let text = cap.text();
    assert!(shown(&text, SECRET).is_none(), "secret piece in logs");
    assert!(shown(&text, token).is_none(), "token piece in logs");
    let _ = Mutex::new(());
}
