//! The RFC 9457 problem types of the answers the server layer makes itself.
//!
//! Every such answer has `Content-Type: application/problem+json` and a body with the members
//! `type` (one of the constants below), `title`, `status` and `detail`, for example:
//!
//! ```text
//! HTTP/1.1 409 Conflict
//! Content-Type: application/problem+json
//! Retry-After: 1
//!
//! {"type":"https://example.invalid/sturdy/problems/idempotency-key-in-flight",
//!  "title":"A request is outstanding for this Idempotency-Key","status":409,
//!  "detail":"the first request with this key is still running; retry after a while with the same key"}
//! ```
//!
//! Match on `type`, never on `title` or `detail` (they are for people and may change). The
//! URIs identify the problem; they are not meant to be fetched.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::{ResponseBody, StoredResponse};

macro_rules! problem_type {
    ($(#[$doc:meta])* $name:ident = $slug:literal) => {
        $(#[$doc])*
        pub const $name: &str = concat!("https://example.invalid/sturdy/problems/", $slug);
    };
}

problem_type!(
    /// 400: the route requires an `Idempotency-Key` and the request has none.
    MISSING_KEY = "idempotency-key-missing"
);
problem_type!(
    /// 400: the `Idempotency-Key` is not 1 to 255 visible ASCII characters, or the request
    /// carries several different `Idempotency-Key` values. Each header line is one key (a comma
    /// is one of its characters), so `k-a, k-a` on one line is refused for its space, while two
    /// lines of `k-a` are the key `k-a`.
    INVALID_KEY = "idempotency-key-invalid"
);
problem_type!(
    /// 409, with `Retry-After`: the first request with this key (same client, same fingerprint)
    /// is still running. Retrying later with the same key gets its stored response. This is
    /// the one conflict a client should retry.
    IN_FLIGHT = "idempotency-key-in-flight"
);
problem_type!(
    /// 422: the key was already used by this client for another request (another method, path,
    /// query or body). Use a new key for a new request.
    KEY_REUSED = "idempotency-key-reused"
);
problem_type!(
    /// 413: the request body is larger than the layer's body limit.
    BODY_TOO_LARGE = "request-body-too-large"
);
problem_type!(
    /// 400: the request body could not be read.
    UNREADABLE_BODY = "request-body-unreadable"
);
problem_type!(
    /// 503, with `Retry-After`: the store could not be reached or is full of running requests;
    /// the request was not processed.
    STORE_UNAVAILABLE = "idempotency-store-unavailable"
);
problem_type!(
    /// 500, stored and replayed: the handler ran, but its response was larger than the layer's
    /// response limit, so it could not be kept. The handler is not run again for this key.
    RESPONSE_TOO_LARGE = "idempotency-response-too-large"
);
problem_type!(
    /// 500: the handler's response body failed while it was read; the key was released.
    RESPONSE_FAILED = "response-body-failed"
);
problem_type!(
    /// 503, with `Retry-After`: the execution was stopped before its outcome was known (the
    /// runtime shut down); its key stays locked until its lease ends.
    INTERRUPTED = "idempotency-execution-interrupted"
);

/// The body and status of a problem.
pub(crate) fn stored(status: StatusCode, type_: &str, title: &str, detail: &str) -> StoredResponse {
    // Written by hand so the members keep this order whatever serde_json's features.
    let json = |s: &str| serde_json::Value::from(s).to_string();
    let body = format!(
        "{{\"type\":{},\"title\":{},\"status\":{},\"detail\":{}}}",
        json(type_),
        json(title),
        status.as_u16(),
        json(detail)
    );
    let mut headers = vec![(
        header::CONTENT_TYPE.as_str().to_owned(),
        b"application/problem+json".to_vec(),
    )];
    if matches!(
        status,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::CONFLICT
    ) {
        headers.push((header::RETRY_AFTER.as_str().to_owned(), b"1".to_vec()));
    }
    StoredResponse {
        status: status.as_u16(),
        headers,
        body: Bytes::from(body),
    }
}

/// A problem response.
pub(crate) fn response<B>(
    status: StatusCode,
    type_: &str,
    title: &str,
    detail: &str,
) -> Response<ResponseBody<B>> {
    to_response(stored(status, type_, title, detail))
}

/// A response from its stored form.
pub(crate) fn to_response<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
    let mut r = Response::new(Either::Left(Full::new(stored.body)));
    *r.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    for (k, v) in stored.headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(&v),
        ) {
            // `try_append`: a stored response past http's largest header map (written by
            // another writer of the store) keeps what fits instead of panicking.
            let _ = r.headers_mut().try_append(k, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_flight_problem_is_exactly_as_documented() {
        let p = stored(
            StatusCode::CONFLICT,
            IN_FLIGHT,
            "A request is outstanding for this Idempotency-Key",
            "the first request with this key is still running; retry after a while with the same \"key\"",
        );
        assert_eq!(p.status, 409);
        assert_eq!(
            p.headers,
            vec![
                (
                    "content-type".to_owned(),
                    b"application/problem+json".to_vec()
                ),
                ("retry-after".to_owned(), b"1".to_vec()),
            ]
        );
        assert_eq!(
            p.body,
            concat!(
                r#"{"type":"https://example.invalid/sturdy/problems/idempotency-key-in-flight","#,
                r#""title":"A request is outstanding for this Idempotency-Key","status":409,"#,
                r#""detail":"the first request with this key is still running; retry after a while with the same \"key\""}"#
            )
        );
        let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["detail"].as_str().unwrap().matches('"').count(), 2);
    }

    #[test]
    fn a_stored_response_with_more_headers_than_http_holds_is_replayed_without_a_panic() {
        // A store another writer filled: 30,000 distinct names, past http's 24,576.
        let stored = StoredResponse {
            status: 200,
            headers: (0..30_000)
                .map(|i| (format!("x-h{i}"), b"v".to_vec()))
                .collect(),
            body: Bytes::new(),
        };
        let r = to_response::<Full<Bytes>>(stored);
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers().len() >= 20_000, "{}", r.headers().len());
        assert!(r.headers().len() < 30_000, "{}", r.headers().len());
    }
}
