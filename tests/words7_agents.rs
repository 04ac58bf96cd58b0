//! docs/guides/agents.md, read literally: the MCP-shaped `tool_result` of a 429 and of a success,
//! `ErrorSummary`'s fields (kinds, status, the 5-minute cap on a server's wait, "may have been
//! processed" false only when nothing reached the server, a token endpoint's failure), the advice
//! sentences, and bounded pages whose cursors cannot be forged. In process, paused time.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::core::summary::tool_result;
use sturdy::core::{BoxError, CircuitOpen, Error, ErrorKind, ErrorSummary, RateLimited};
use sturdy::paginate::{BoundedPage, PageNumber, Paginate};
use sturdy::retry::RetryLayer;
use tower::{service_fn, Layer, ServiceExt};

fn status_api(
    status: u16,
    retry_after: &'static str,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |_req: Request<Full<Bytes>>| async move {
        Ok::<_, Infallible>(
            Response::builder()
                .status(status)
                .header("retry-after", retry_after)
                .body(Full::default())
                .unwrap(),
        )
    })
}

async fn retry_error(status: u16, retry_after: &'static str) -> BoxError {
    RetryLayer::new()
        .layer(status_api(status, retry_after))
        .oneshot(
            Request::get("http://api.example.com/orders")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err()
}

/// agents.md:29-41: the JSON of a 429 with `Retry-After: 120` that the retry layer gave up on.
#[tokio::test(start_paused = true)]
async fn the_tool_result_of_a_429_is_the_guides_json() {
    let err = retry_error(429, "120").await;
    let out = tool_result::<Value>(Err(err));
    assert_eq!(out["isError"], true);
    assert_eq!(out["content"].as_array().unwrap().len(), 1);
    assert_eq!(out["content"][0]["type"], "text");
    assert_eq!(
        out["content"][0]["text"],
        "rate limited by api.example.com; retry after 2m\nTry again in 2m; it may already have been processed, so check before sending it again."
    );
    let e = &out["structuredContent"]["error"];
    assert_eq!(e["kind"], "rate_limited");
    assert_eq!(e["status"], Value::Null);
    assert_eq!(
        e["message"],
        "rate limited by api.example.com; retry after 2m"
    );
    assert_eq!(e["retryable"], true);
    assert_eq!(e["retry_after_ms"], 120_000);
    assert_eq!(e["may_have_been_processed"], true);
    assert_eq!(e["idempotency_key"], Value::Null);
    assert_eq!(e["attempts"], 1);
    // Exactly the fields of the table (agents.md:48-57), flat.
    let mut keys: Vec<_> = e.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "attempts",
            "idempotency_key",
            "kind",
            "may_have_been_processed",
            "message",
            "retry_after_ms",
            "retryable",
            "status"
        ]
    );
}

/// agents.md:43: "On success the text is the value as JSON and `structuredContent` is
/// `{"result": value}`."
#[test]
fn the_tool_result_of_a_success_is_the_value_as_json() {
    let value = json!({"order": 42, "items": ["a", "b"]});
    let out = tool_result::<Value>(Ok(value.clone()));
    assert_ne!(out["isError"], true);
    let text = out["content"][0]["text"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(text).unwrap(), value);
    assert_eq!(out["content"][0]["type"], "text");
    assert_eq!(out["structuredContent"], json!({ "result": value }));
}

/// agents.md:50: the `kind` values, one per kind of error.
#[test]
fn each_error_kind_has_the_guides_kind_name() {
    let cases = [
        (ErrorKind::Auth, "auth"),
        (ErrorKind::RateLimited { retry_after: None }, "rate_limited"),
        (
            ErrorKind::CircuitOpen {
                retry_in: Duration::from_secs(1),
            },
            "circuit_open",
        ),
        (ErrorKind::Timeout, "timeout"),
        (ErrorKind::Connect, "connect"),
        (ErrorKind::Tls, "tls"),
        (ErrorKind::Transport, "transport"),
        (ErrorKind::Server(StatusCode::BAD_GATEWAY), "server_error"),
        (ErrorKind::Client(StatusCode::NOT_FOUND), "client_error"),
        (ErrorKind::Body, "body"),
        (ErrorKind::Pagination, "pagination"),
        (ErrorKind::Config, "config"),
        (ErrorKind::Other, "other"),
    ];
    for (kind, name) in cases {
        let s = ErrorSummary::of(&Error::new(kind.clone(), "m"));
        assert_eq!(s.kind, name, "{kind:?}");
        // agents.md:51: the status for server_error and client_error only.
        match kind {
            ErrorKind::Server(st) | ErrorKind::Client(st) => {
                assert_eq!(s.status, Some(st.as_u16()));
            }
            _ => assert_eq!(s.status, None, "{kind:?}"),
        }
    }
}

/// agents.md:54: "`retry_after_ms` ... (a server's wait capped at 5 min,
/// `sturdy_retry::MAX_REPORTED_WAIT`)": the largest number of seconds a peer can send, and the
/// last HTTP date there is.
#[tokio::test(start_paused = true)]
async fn a_servers_wait_is_reported_capped_at_5_minutes() {
    assert_eq!(sturdy::retry::MAX_REPORTED_WAIT, Duration::from_secs(300));
    for ra in [
        "18446744073709551615",
        "99999999999999999999",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "86400",
    ] {
        let err = retry_error(503, ra).await;
        let s = ErrorSummary::of(&*err);
        assert_eq!(s.retry_after_ms, Some(300_000), "Retry-After: {ra}");
        assert!(err.to_string().ends_with("retry after 5m"), "{ra}: {err}");
    }
}

/// agents.md:59-60: "`ErrorSummary::advice()` is the second line of the text: one sentence ("Try
/// again in 30s; the request was not processed.", "Trying again unchanged will not help; ...")."
#[test]
fn advice_is_one_of_the_guides_sentences() {
    let open: BoxError = Box::new(CircuitOpen::new("api.example.com", Duration::from_secs(30)));
    let s = ErrorSummary::of(&*open);
    assert_eq!(
        s.advice(),
        "Try again in 30s; the request was not processed."
    );
    let not_found: BoxError = Box::new(Error::new(
        ErrorKind::Client(StatusCode::NOT_FOUND),
        "no such order",
    ));
    let s = ErrorSummary::of(&*not_found);
    assert!(!s.retryable);
    assert!(
        s.advice()
            .starts_with("Trying again unchanged will not help; "),
        "{}",
        s.advice()
    );
    // The second line of the text is the advice.
    let text = tool_result::<Value>(Err(not_found))["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(text.split('\n').nth(1), Some(s.advice().as_str()));
}

/// agents.md:62-64: "it is false only when no attempt of the call reached the server (a refused
/// connection, an untrusted certificate, an open breaker, a local rate limit, no token)"; true
/// otherwise, also for an error nobody recognises.
#[test]
fn may_have_been_processed_is_false_only_when_nothing_reached_the_server() {
    let not_sent: Vec<BoxError> = vec![
        Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        Box::new(CircuitOpen::new("api.example.com", Duration::from_secs(3))),
        Box::new(RateLimited::new(Duration::from_secs(3))),
    ];
    for e in &not_sent {
        assert!(!ErrorSummary::of(&**e).may_have_been_processed, "{e}");
    }
    let maybe: Vec<BoxError> = vec![
        Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut)),
        Box::new(Error::new(ErrorKind::Timeout, "the attempt timed out")),
        Box::new(Error::new(
            ErrorKind::Server(StatusCode::BAD_GATEWAY),
            "502",
        )),
        "something nobody recognises".into(),
    ];
    for e in &maybe {
        assert!(ErrorSummary::of(&**e).may_have_been_processed, "{e}");
    }
}

/// agents.md:51 and :62-64: when getting a token failed, `status` is the token endpoint's, the
/// message names it, and `may_have_been_processed` is false ("no token").
#[tokio::test(start_paused = true)]
async fn a_failed_token_fetch_reports_the_token_endpoints_status_and_not_processed() {
    let api_calls = Arc::new(AtomicUsize::new(0));
    let a = api_calls.clone();
    let http = service_fn(move |req: Request<Full<Bytes>>| {
        let a = a.clone();
        async move {
            let status = if req.uri().path() == "/oauth/token" {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                a.fetch_add(1, Ordering::SeqCst);
                StatusCode::OK
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let tokens = ClientCredentials::new(
        http.clone(),
        "http://auth.example.com/oauth/token",
        "id",
        "s3cr3t-value",
    )
    .unwrap();
    let client = AuthLayer::oauth2(tokens).layer(http);
    let err = client
        .oneshot(
            Request::post("http://api.example.com/orders")
                .body(Full::from("x"))
                .unwrap(),
        )
        .await
        .unwrap_err();
    let s = ErrorSummary::of(&*err);
    assert_eq!(api_calls.load(Ordering::SeqCst), 0);
    assert_eq!(s.status, Some(503), "{s:?}");
    assert!(s.message.contains("auth.example.com"), "{}", s.message);
    assert!(!s.may_have_been_processed, "{s:?}");
    assert!(!s.message.contains("s3cr3t-value"));
}

/// A page-number API of 7 items, 2 per page; counts requests.
fn pages_api(
    count: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |req: Request<Full<Bytes>>| {
        count.fetch_add(1, Ordering::SeqCst);
        let q = req.uri().query().unwrap_or("").to_owned();
        async move {
            let mut page = 1usize;
            let mut per = 20usize;
            for pair in q.split('&') {
                if let Some(v) = pair.strip_prefix("page=") {
                    page = v.parse().unwrap();
                }
                if let Some(v) = pair.strip_prefix("per_page=") {
                    per = v.parse().unwrap();
                }
            }
            let items: Vec<u32> = (1..=7u32).skip((page - 1) * per).take(per).collect();
            let body = json!({ "items": items }).to_string();
            Ok::<_, Infallible>(Response::new(Full::from(body)))
        }
    })
}

/// agents.md:21-25: a `BoundedPage { items, has_more, next_cursor }` that serialises as is; a
/// cursor the model made up or edited is refused before any request is sent; `with_cursor_key`
/// keeps cursors valid across pagers (restarts).
#[tokio::test]
async fn bounded_pages_serialise_as_is_and_refuse_forged_cursors_before_any_request() {
    let count = Arc::new(AtomicUsize::new(0));
    let pager = Paginate::builder(
        pages_api(count.clone()),
        "http://api.example.com/items",
        PageNumber::new("/items"),
    )
    .with_cursor_key(b"a key of at least some length 0123456789")
    .build()
    .unwrap();
    let first: BoundedPage = pager.page(None, 3).await.unwrap();
    assert_eq!(first.items, vec![json!(1), json!(2), json!(3)]);
    assert!(first.has_more);
    let cursor = first.next_cursor.clone().unwrap();
    let v = serde_json::to_value(&first).unwrap();
    assert_eq!(
        v,
        json!({ "items": [1, 2, 3], "has_more": true, "next_cursor": cursor })
    );

    // Edited and made-up cursors: refused, nothing sent.
    let sent = count.load(Ordering::SeqCst);
    let mut edited = cursor.clone().into_bytes();
    let last = edited.len() - 1;
    edited[last] = if edited[last] == b'A' { b'B' } else { b'A' };
    let edited = String::from_utf8(edited).unwrap();
    for forged in [edited.as_str(), "page=99", "", "eyJwYWdlIjo5OX0"] {
        assert!(pager.page(Some(forged), 3).await.is_err(), "{forged:?}");
    }
    assert_eq!(
        count.load(Ordering::SeqCst),
        sent,
        "a forged cursor sent a request"
    );

    // Another pager with the same key (a restart) takes the cursor and resumes after item 3.
    let again = Paginate::builder(
        pages_api(count.clone()),
        "http://api.example.com/items",
        PageNumber::new("/items"),
    )
    .with_cursor_key(b"a key of at least some length 0123456789")
    .build()
    .unwrap();
    let next = again.page(Some(&cursor), 3).await.unwrap();
    assert_eq!(next.items, vec![json!(4), json!(5), json!(6)]);
}
