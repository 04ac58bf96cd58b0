//! `page()` guards as an agent meets them: slow, oversized, malformed, failing and looping
//! pages, foreign next links, all under a first-page URI that carries an API key in its query.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{json, Value};
use sturdy::core::summary::{tool_result, ErrorSummary};
use sturdy::core::{BoxError, ErrorKind};
use sturdy::paginate::{JsonCursor, LinkHeader, Paginate};
use tower::service_fn;

type Body = BoxBody<Bytes, Infallible>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

/// What the fake API answers for the page at this query.
type Answer = Arc<dyn Fn(&str, usize) -> Response<Body> + Send + Sync>;

fn api(
    answer: Answer,
    hits: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |req: Request<Full<Bytes>>| {
        let n = hits.fetch_add(1, Ordering::SeqCst);
        let res = answer(req.uri().query().unwrap_or(""), n);
        async move { Ok::<_, Infallible>(res) }
    })
}

const URI: &str = "http://api.example.com/items?api_key=SECRET1";

fn no_secret(err: &sturdy::core::Error) {
    let shown = format!("{err} | {err:?}");
    for s in ["SECRET1", "SECRET2", "hunter2"] {
        assert!(!shown.contains(s), "{shown}");
    }
    let out = tool_result::<Value>(Err(BoxError::from(err.to_string())));
    let _ = out;
    let s = serde_json::to_string(&ErrorSummary::of(err)).unwrap();
    for secret in ["SECRET1", "SECRET2", "hunter2"] {
        assert!(!s.contains(secret), "{s}");
    }
    assert!(!ErrorSummary::of(err).advice().is_empty());
}

fn json_cursor_pager(answer: Answer, hits: Arc<AtomicUsize>) -> Paginate<JsonCursor> {
    Paginate::builder(api(answer, hits), URI, JsonCursor::new("/data", "/next"))
        .with_page_timeout(Duration::from_secs(1))
        .with_max_page_bytes(1024)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn agents27_a_stalled_body_is_a_timeout_without_the_key() {
    let answer: Answer = Arc::new(|_q, _n| {
        let head = futures_util::stream::iter(vec![Ok::<_, Infallible>(http_body::Frame::data(
            Bytes::from_static(b"{\"data\": [1,"),
        ))]);
        let stall = futures_util::stream::pending();
        Response::new(StreamBody::new(futures_util::StreamExt::chain(head, stall)).boxed())
    });
    let pager = json_cursor_pager(answer, Arc::default());
    let started = tokio::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), pager.page(None, 5))
        .await
        .expect("page() hung")
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Timeout, "{err}");
    assert!(started.elapsed() <= Duration::from_millis(1100));
    let s = ErrorSummary::of(&err);
    assert_eq!(s.kind, "timeout");
    assert!(s.retryable);
    no_secret(&err);
}

#[tokio::test]
async fn agents27_an_oversized_endless_body_is_a_body_error_without_the_key() {
    let answer: Answer = Arc::new(|_q, _n| {
        let endless = futures_util::stream::repeat_with(|| {
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(&[b' '; 100])))
        });
        Response::new(StreamBody::new(endless).boxed())
    });
    let pager = json_cursor_pager(answer, Arc::default());
    let err = tokio::time::timeout(Duration::from_secs(10), pager.page(None, 5))
        .await
        .expect("page() hung")
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Body, "{err}");
    no_secret(&err);
}

#[tokio::test]
async fn agents27_error_statuses_keep_their_kind_and_status() {
    for (status, kind) in [
        (404, "client_error"),
        (400, "client_error"),
        (503, "server_error"),
        (500, "server_error"),
        (401, "auth"),
    ] {
        let answer: Answer = Arc::new(move |_q, _n| {
            Response::builder()
                .status(status)
                .body(full("{\"error\":\"nope\"}"))
                .unwrap()
        });
        let pager = json_cursor_pager(answer, Arc::default());
        let err = pager.page(None, 5).await.unwrap_err();
        let s = ErrorSummary::of(&err);
        assert_eq!(s.kind, kind, "{status}: {err}");
        if kind != "auth" {
            assert_eq!(s.status, Some(status), "{status}: {err}");
        }
        no_secret(&err);
    }
}

#[tokio::test]
async fn agents27_bad_json_names_the_page_and_hides_the_key() {
    let answer: Answer = Arc::new(|q, _n| {
        if q.contains("cursor=") {
            Response::new(full("<html>oops</html>"))
        } else {
            Response::new(full(json!({ "data": [1, 2], "next": "c2" }).to_string()))
        }
    });
    let pager = json_cursor_pager(answer, Arc::default());
    let err = pager.page(None, 5).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    assert!(err.to_string().contains("page 2"), "{err}");
    let s = ErrorSummary::of(&err);
    assert!(!s.retryable, "{err}");
    no_secret(&err);
}

fn link_pager(answer: Answer, hits: Arc<AtomicUsize>) -> Paginate<LinkHeader> {
    Paginate::builder(api(answer, hits), URI, LinkHeader::new("/data"))
        .build()
        .unwrap()
}

fn linked(next: &str) -> Response<Body> {
    Response::builder()
        .header("link", format!("<{next}>; rel=\"next\""))
        .body(full("{\"data\": [1, 2, 3]}"))
        .unwrap()
}

#[tokio::test]
async fn agents27_foreign_next_link_refused_without_leaking_its_credentials() {
    let hits = Arc::new(AtomicUsize::new(0));
    let answer: Answer = Arc::new(|_q, _n| {
        linked("https://user:hunter2@evil.example.net/items?api_key=SECRET2&page=2")
    });
    let pager = link_pager(answer, hits.clone());
    // A whole page's worth: the foreign link is met within the call.
    let err = pager.page(None, 10).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    no_secret(&err);
    // The items of the first page alone: the cursor leads off-origin; following it is refused.
    let hits = Arc::new(AtomicUsize::new(0));
    let answer: Answer = Arc::new(|_q, _n| {
        linked("https://user:hunter2@evil.example.net/items?api_key=SECRET2&page=2")
    });
    let pager = link_pager(answer, hits.clone());
    match pager.page(None, 3).await {
        Ok(p) => {
            if let Some(c) = p.next_cursor {
                let err = pager.page(Some(&c), 3).await.unwrap_err();
                assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
                no_secret(&err);
            }
        }
        Err(err) => no_secret(&err),
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1, "a foreign page was fetched");
}

#[tokio::test]
async fn agents27_a_looping_link_is_an_error_without_the_key() {
    let hits = Arc::new(AtomicUsize::new(0));
    // Page 2 links back to page 1.
    let answer: Answer = Arc::new(|q, _n| {
        if q.contains("page=2") {
            linked("/items?api_key=SECRET1")
        } else {
            linked("/items?api_key=SECRET1&page=2")
        }
    });
    let pager = link_pager(answer, hits.clone());
    let err = tokio::time::timeout(Duration::from_secs(5), pager.page(None, 100))
        .await
        .expect("hung")
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    no_secret(&err);
    assert!(hits.load(Ordering::SeqCst) <= 3);
}

#[tokio::test]
async fn agents27_a_self_cursor_is_refused_across_calls() {
    let hits = Arc::new(AtomicUsize::new(0));
    // Every page says its next cursor is "same".
    let answer: Answer = Arc::new(|_q, _n| {
        Response::new(full(
            json!({ "data": [1, 2, 3], "next": "same" }).to_string(),
        ))
    });
    let pager = json_cursor_pager(answer, hits.clone());
    let mut cursor: Option<String> = None;
    let mut seen_items = 0;
    for _ in 0..10 {
        match pager.page(cursor.as_deref(), 3).await {
            Ok(p) => {
                seen_items += p.items.len();
                cursor = p.next_cursor;
                if cursor.is_none() {
                    break;
                }
            }
            Err(err) => {
                assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
                no_secret(&err);
                break;
            }
        }
    }
    assert!(
        seen_items <= 6,
        "the agent read {seen_items} items of a 1-page loop"
    );
}

#[tokio::test]
async fn agents27_dropped_page_call_leaves_the_pager_usable() {
    let hits = Arc::new(AtomicUsize::new(0));
    let answer: Answer = Arc::new(|_q, n| {
        if n == 0 {
            Response::new(StreamBody::new(futures_util::stream::pending()).boxed())
        } else {
            Response::new(full(json!({ "data": [1, 2, 3], "next": null }).to_string()))
        }
    });
    let pager = json_cursor_pager(answer, hits.clone());
    assert!(
        tokio::time::timeout(Duration::from_millis(50), pager.page(None, 3))
            .await
            .is_err()
    );
    let p = tokio::time::timeout(Duration::from_secs(5), pager.page(None, 3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.items.len(), 3);
    assert!(!p.has_more);
    let _ = StatusCode::OK;
}
