//! `POST /oauth/token`: OAuth2 client credentials (RFC 6749 §4.4) with `client_secret_basic`
//! (§2.3.1: id and secret form-urlencoded, then Basic) or `client_secret_post`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use rand::Rng;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::state::{bump, lock, Shared};

fn oauth_error(status: StatusCode, code: &str, description: &str) -> Response {
    let mut r = (
        status,
        Json(json!({ "error": code, "error_description": description })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn form_decode(part: &str) -> String {
    form_urlencoded::parse(part.as_bytes())
        .next()
        .map(|(k, _)| k.into_owned())
        .unwrap_or_default()
}

fn basic_credentials(headers: &HeaderMap) -> Option<Option<(String, String)>> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v.strip_prefix("Basic ")?;
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return Some(None);
    };
    let Ok(text) = String::from_utf8(raw) else {
        return Some(None);
    };
    Some(
        text.split_once(':')
            .map(|(id, secret)| (form_decode(id), form_decode(secret))),
    )
}

pub(crate) async fn token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    bump(&s.counters.token_requests);
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let (lifetime, expires_override, want_id, want_secret) = {
        let mut k = lock(&s.knobs);
        if let Some((status, raw)) = &k.token_response {
            let mut r = Response::new(axum::body::Body::from(raw.clone()));
            *r.status_mut() =
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return r;
        }
        if k.token_fail_next > 0 {
            k.token_fail_next -= 1;
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "injected failure",
            );
        }
        (
            k.token_lifetime,
            k.token_expires_in.clone(),
            k.client_id.clone(),
            k.client_secret.clone(),
        )
    };
    let basic = basic_credentials(&headers);
    let in_body = field("client_id").map(|id| {
        (
            id.to_owned(),
            field("client_secret").unwrap_or("").to_owned(),
        )
    });
    let creds = match (basic, in_body) {
        (Some(_), Some(_)) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "use one client authentication method",
            )
        }
        (Some(Some(c)), None) => Some((c, true)),
        (Some(None), None) => None,
        (None, Some(c)) => Some((c, false)),
        (None, None) => None,
    };
    if field("grant_type") != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only client_credentials is supported",
        );
    }
    let ok = creds
        .as_ref()
        .is_some_and(|((id, secret), _)| *id == want_id && *secret == want_secret);
    if !ok {
        let mut r = oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
        if creds.as_ref().is_none_or(|(_, basic)| *basic) {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"token\""),
            );
        }
        return r;
    }
    let token: String = {
        let mut rng = lock(&s.rng);
        (0..32)
            .map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)]))
            .collect()
    };
    lock(&s.tokens).insert(
        token.clone(),
        sturdy_core::clock::after(Instant::now(), lifetime),
    );
    bump(&s.counters.tokens_issued);
    let mut out =
        json!({ "access_token": token, "token_type": "Bearer", "expires_in": lifetime.as_secs() });
    match expires_override {
        Some(Value::Null) => {
            out.as_object_mut().map(|o| o.remove("expires_in"));
        }
        Some(v) => out["expires_in"] = v,
        None => {}
    }
    if let Some(scope) = field("scope") {
        out["scope"] = Value::String(scope.to_owned());
    }
    let mut r = Json(out).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}
