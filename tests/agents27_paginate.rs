//! Bounded pages for agent tools: cursors handed back (edited, truncated, foreign, hostile),
//! resuming exactly under changing limits, and what an agent reads when a call fails.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use serde_json::{json, Value};
use sturdy::core::summary::{tool_result, ErrorSummary};
use sturdy::core::{BoxError, ErrorKind};
use sturdy::paginate::{
    BoundedPage, JsonCursor, OffsetLimit, PageNumber, Paginate, MAX_CURSOR_LEN,
};
use tower::service_fn;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef-agents";

fn query(req: &Request<Full<Bytes>>) -> Vec<(String, String)> {
    let q = req.uri().query().unwrap_or("");
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn param(req: &Request<Full<Bytes>>, name: &str) -> Option<String> {
    query(req)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn json_response(v: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::from(v.to_string()))
        .unwrap()
}

/// `n` items `0..n`; pages capped at `cap` items whatever was asked. Counts requests.
#[derive(Clone, Copy)]
enum Api {
    Cursor,
    Offset,
    Numbered,
}

fn api(
    kind: Api,
    n: usize,
    cap: usize,
    hits: Arc<AtomicUsize>,
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
        hits.fetch_add(1, Ordering::SeqCst);
        let body = match kind {
            Api::Cursor => {
                let start: usize = param(&req, "cursor").map_or(0, |c| c.parse().unwrap());
                let size: usize = param(&req, "limit").map_or(20, |c| c.parse().unwrap());
                let end = (start + size.min(cap)).min(n);
                let next = if end < n {
                    json!(end.to_string())
                } else {
                    Value::Null
                };
                json!({ "data": (start..end).collect::<Vec<_>>(), "next": next })
            }
            Api::Offset => {
                let start: usize = param(&req, "offset").map_or(0, |c| c.parse().unwrap());
                let size: usize = param(&req, "limit").map_or(20, |c| c.parse().unwrap());
                let end = (start + size.min(cap)).min(n);
                json!({ "data": (start.min(n)..end).collect::<Vec<_>>(), "total": n })
            }
            Api::Numbered => {
                let page: usize = param(&req, "page").map_or(1, |c| c.parse().unwrap());
                let size: usize = param(&req, "per_page").map_or(20, |c| c.parse().unwrap());
                let size = size.min(cap);
                let start = ((page - 1) * size).min(n);
                let end = (start + size).min(n);
                json!({ "data": (start..end).collect::<Vec<_>>(), "total": n })
            }
        };
        async move { Ok::<_, Infallible>(json_response(&body)) }
    })
}

fn ids(p: &BoundedPage) -> Vec<u64> {
    p.items.iter().map(|v| v.as_u64().unwrap()).collect()
}

/// Walks with a different `limit` on every call; returns every id read and the calls made.
async fn walk_with_limits<P: sturdy::paginate::PageStrategy>(
    pager: &Paginate<P>,
    limits: &[usize],
) -> Vec<u64> {
    let mut cursor: Option<String> = None;
    let mut all = Vec::new();
    for (i, limit) in limits.iter().cycle().enumerate() {
        let page = tokio::time::timeout(
            Duration::from_secs(5),
            pager.page(cursor.as_deref(), *limit),
        )
        .await
        .expect("page() hung")
        .unwrap_or_else(|e| panic!("call {i} (limit {limit}): {e}"));
        assert!(page.items.len() <= (*limit).max(1), "more than the limit");
        assert_eq!(
            page.has_more,
            page.next_cursor.is_some(),
            "has_more and next_cursor disagree"
        );
        all.extend(ids(&page));
        if !page.has_more {
            return all;
        }
        cursor = page.next_cursor;
        assert!(i < 500, "no end");
    }
    unreachable!()
}

const LIMITS: &[usize] = &[7, 13, 1, 50, 3, 100, 0, 29, 2];

#[tokio::test]
async fn agents27_cursor_api_resumes_exactly_under_changing_limits() {
    let hits = Arc::new(AtomicUsize::new(0));
    let pager = Paginate::builder(
        api(Api::Cursor, 203, 1000, hits.clone()),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let got = walk_with_limits(&pager, LIMITS).await;
    assert_eq!(got, (0..203).collect::<Vec<u64>>());
}

#[tokio::test]
async fn agents27_offset_api_resumes_exactly_under_changing_limits() {
    let hits = Arc::new(AtomicUsize::new(0));
    let pager = Paginate::builder(
        api(Api::Offset, 203, 1000, hits.clone()),
        "http://api.example.com/items",
        OffsetLimit::new("/data").with_total("/total"),
    )
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let got = walk_with_limits(&pager, LIMITS).await;
    assert_eq!(got, (0..203).collect::<Vec<u64>>());
}

#[tokio::test]
async fn agents27_numbered_api_resumes_exactly_under_changing_limits() {
    let hits = Arc::new(AtomicUsize::new(0));
    let pager = Paginate::builder(
        api(Api::Numbered, 203, 1000, hits.clone()),
        "http://api.example.com/items",
        PageNumber::new("/data").with_total("/total"),
    )
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let got = walk_with_limits(&pager, LIMITS).await;
    assert_eq!(got, (0..203).collect::<Vec<u64>>());
}

#[tokio::test]
async fn agents27_capped_offset_api_resumes_exactly() {
    // The server gives at most 10 items whatever is asked; the total says when it ends.
    let hits = Arc::new(AtomicUsize::new(0));
    let pager = Paginate::builder(
        api(Api::Offset, 57, 10, hits.clone()),
        "http://api.example.com/items",
        OffsetLimit::new("/data").with_total("/total"),
    )
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let got = walk_with_limits(&pager, LIMITS).await;
    assert_eq!(got, (0..57).collect::<Vec<u64>>());
}

#[tokio::test]
async fn agents27_capped_numbered_api_resumes_exactly() {
    let hits = Arc::new(AtomicUsize::new(0));
    let pager = Paginate::builder(
        api(Api::Numbered, 57, 10, hits.clone()),
        "http://api.example.com/items",
        PageNumber::new("/data").with_total("/total"),
    )
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let got = walk_with_limits(&pager, LIMITS).await;
    assert_eq!(got, (0..57).collect::<Vec<u64>>());
}

fn cursor_pager(hits: Arc<AtomicUsize>, uri: &str) -> Paginate<JsonCursor> {
    Paginate::builder(
        api(Api::Cursor, 100, 1000, hits),
        uri,
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(KEY)
    .build()
    .unwrap()
}

fn assert_refused(err: &sturdy::core::Error, cursor: &str) {
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{cursor:?}: {err}");
    let s = ErrorSummary::of(err);
    assert_eq!(s.kind, "pagination");
    assert!(
        !s.retryable,
        "{cursor:?}: a refused cursor is not retryable"
    );
    assert!(!s.advice().is_empty());
}

#[tokio::test]
async fn agents27_every_prefix_and_every_one_char_edit_of_a_cursor_is_refused_before_a_request() {
    let hits = Arc::new(AtomicUsize::new(0));
    let pager = cursor_pager(hits.clone(), "http://api.example.com/items");
    let first = pager.page(None, 5).await.unwrap();
    let good = first.next_cursor.unwrap();
    let before = hits.load(Ordering::SeqCst);
    for cut in 0..good.len() {
        let c = &good[..cut];
        let err = pager.page(Some(c), 5).await.unwrap_err();
        assert_refused(&err, c);
    }
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=";
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    for i in 0..good.len() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut bytes = good.clone().into_bytes();
        let mut ch = alphabet[(rng % alphabet.len() as u64) as usize];
        if ch == bytes[i] {
            ch = if ch == b'A' { b'B' } else { b'A' };
        }
        bytes[i] = ch;
        let c = String::from_utf8(bytes).unwrap();
        // A change that decodes to the same bytes (the last character's unused bits) is
        // the same cursor; anything else must be refused.
        if let Err(err) = pager.page(Some(&c), 5).await {
            assert_refused(&err, &c);
        } else {
            assert!(i == good.len() - 1, "edited cursor {c:?} accepted at {i}");
        }
    }
    // A cursor with something appended.
    for tail in ["A", "AA", "AAAA", "=", "==", " ", "\n", "\u{0}"] {
        let c = format!("{good}{tail}");
        let r = pager.page(Some(&c), 5).await;
        if let Err(err) = r {
            assert_refused(&err, &c);
        }
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        before,
        "a refused cursor made a request"
    );
}

#[tokio::test]
async fn agents27_hostile_cursors_never_panic_and_never_send() {
    let hits = Arc::new(AtomicUsize::new(0));
    let pager = cursor_pager(hits.clone(), "http://api.example.com/items");
    let mut hostile: Vec<String> = vec![
        String::new(),
        " ".into(),
        "null".into(),
        "{}".into(),
        "eyJjIjoiOTk5In0".into(),
        "eyJjIjoiOTk5In0=".into(),
        "////".into(),
        "\u{FEFF}".into(),
        "\u{0}".repeat(100),
        "é".repeat(MAX_CURSOR_LEN / 2),
        "é".repeat(MAX_CURSOR_LEN / 2 + 1),
        "€".repeat(MAX_CURSOR_LEN / 3 + 1),
        "€".repeat(MAX_CURSOR_LEN),
        "😀".repeat(MAX_CURSOR_LEN / 4 + 1),
        "a".repeat(MAX_CURSOR_LEN),
        "a".repeat(MAX_CURSOR_LEN + 1),
        "A".repeat(10 * 1024 * 1024),
    ];
    // Base64url of random bytes of every length up to 80.
    let mut rng: u64 = 7;
    for len in 0..80 {
        let mut raw = Vec::new();
        for _ in 0..len {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            raw.push((rng >> 33) as u8);
        }
        hostile.push(b64url(&raw));
        // 16 random bytes then JSON that looks like a resume point.
        let mut with_json = raw.iter().copied().take(16).collect::<Vec<u8>>();
        with_json.resize(16, 0);
        with_json.extend_from_slice(br#"{"c":"50","s":3,"n":18446744073709551615}"#);
        hostile.push(b64url(&with_json));
    }
    for c in &hostile {
        let r = tokio::time::timeout(Duration::from_secs(5), pager.page(Some(c), 5))
            .await
            .expect("page() hung");
        let err = r.expect_err("a hostile cursor was accepted");
        assert_refused(&err, &c.chars().take(40).collect::<String>());
        // The message stays short whatever the cursor.
        assert!(
            err.to_string().len() < 1000,
            "message of {} bytes",
            err.to_string().len()
        );
        let out = tool_result::<Value>(Err(BoxError::from(err)));
        assert_eq!(out["isError"], true);
        assert_eq!(out["structuredContent"]["error"]["kind"], "pagination");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

fn b64url(raw: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in raw.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn agents27_cursor_of_another_endpoint_or_key_is_refused() {
    let hits = Arc::new(AtomicUsize::new(0));
    let a = cursor_pager(hits.clone(), "http://api.example.com/items");
    let b = cursor_pager(hits.clone(), "http://api.example.com/other");
    let c = cursor_pager(hits.clone(), "http://api.example.com/items?status=open");
    let d = cursor_pager(hits.clone(), "http://API.example.com:80/items");
    let e = Paginate::builder(
        api(Api::Cursor, 100, 1000, hits.clone()),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .build()
    .unwrap();
    let cur = a.page(None, 5).await.unwrap().next_cursor.unwrap();
    let before = hits.load(Ordering::SeqCst);
    for (name, p) in [("other path", &b), ("other query", &c), ("random key", &e)] {
        let err = p.page(Some(&cur), 5).await.expect_err(name);
        assert_refused(&err, name);
    }
    assert_eq!(hits.load(Ordering::SeqCst), before);
    // The same origin written differently is the same endpoint or refused: either way, no panic
    // and no item twice.
    if let Ok(p) = d.page(Some(&cur), 5).await {
        assert_eq!(ids(&p), vec![5, 6, 7, 8, 9]);
    }
}

#[tokio::test]
async fn agents27_a_clone_and_a_keyed_twin_accept_the_cursor() {
    let hits = Arc::new(AtomicUsize::new(0));
    let a = cursor_pager(hits.clone(), "http://api.example.com/items");
    let twin = cursor_pager(hits.clone(), "http://api.example.com/items");
    let cur = a.page(None, 5).await.unwrap().next_cursor.unwrap();
    assert_eq!(
        ids(&a.clone().page(Some(&cur), 5).await.unwrap()),
        vec![5, 6, 7, 8, 9]
    );
    assert_eq!(
        ids(&twin.page(Some(&cur), 5).await.unwrap()),
        vec![5, 6, 7, 8, 9]
    );
    // A cursor used twice gives the same items (the agent retried its call).
    assert_eq!(
        ids(&twin.page(Some(&cur), 5).await.unwrap()),
        vec![5, 6, 7, 8, 9]
    );
}

#[tokio::test]
async fn agents27_limit_extremes() {
    let hits = Arc::new(AtomicUsize::new(0));
    let pager = Paginate::builder(
        api(Api::Cursor, 30, 1000, hits.clone()),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(KEY)
    .with_max_items(12)
    .build()
    .unwrap();
    let p = pager.page(None, 0).await.unwrap();
    assert_eq!(ids(&p), vec![0]);
    let p = pager
        .page(p.next_cursor.as_deref(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(ids(&p), (1..13).collect::<Vec<_>>());
    assert!(p.has_more);
    let p = pager
        .page(p.next_cursor.as_deref(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(ids(&p), (13..25).collect::<Vec<_>>());
    let p = pager
        .page(p.next_cursor.as_deref(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(ids(&p), (25..30).collect::<Vec<_>>());
    assert!(!p.has_more);
    assert!(p.next_cursor.is_none());
}

#[tokio::test]
async fn agents27_success_is_the_page_as_json_in_mcp_shape() {
    let hits = Arc::new(AtomicUsize::new(0));
    let pager = cursor_pager(hits, "http://api.example.com/items");
    let p = pager.page(None, 3).await.unwrap();
    let value = serde_json::to_value(&p).unwrap();
    assert_eq!(value["items"], json!([0, 1, 2]));
    assert_eq!(value["has_more"], true);
    assert!(value["next_cursor"].is_string());
    let out = tool_result(Ok::<_, BoxError>(p));
    assert_eq!(out["isError"], false);
    assert_eq!(out["content"][0]["type"], "text");
    let text: Value = serde_json::from_str(out["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(text, value);
    assert_eq!(out["structuredContent"], json!({ "result": value }));
}

/// A server whose next cursor is `len` characters long.
fn long_cursor_api(
    len: usize,
    ch: char,
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
        let first = param(&req, "cursor").is_none();
        let body = if first {
            json!({ "data": [1, 2, 3], "next": ch.to_string().repeat(len) })
        } else {
            json!({ "data": [4], "next": null })
        };
        async move { Ok::<_, Infallible>(json_response(&body)) }
    })
}

#[tokio::test]
async fn agents27_any_cursor_page_returns_is_accepted_back() {
    // Whatever length of server cursor page() accepts to hand out, it takes back.
    for len in [100, 4_000, 8_000, 11_000, 11_900, 12_100, 15_000, 20_000] {
        for ch in ['x', 'é', '+'] {
            let pager = Paginate::builder(
                long_cursor_api(len, ch),
                "http://api.example.com/items",
                JsonCursor::new("/data", "/next"),
            )
            .with_cursor_key(KEY)
            .build()
            .unwrap();
            match pager.page(None, 3).await {
                Ok(p) => {
                    let c = p.next_cursor.expect("more");
                    assert!(c.len() <= MAX_CURSOR_LEN, "{len}{ch}: {} long", c.len());
                    let next = pager
                        .page(Some(&c), 3)
                        .await
                        .unwrap_or_else(|e| panic!("{len}{ch}: own cursor refused: {e}"));
                    assert_eq!(next.items, vec![json!(4)]);
                }
                Err(e) => {
                    assert_eq!(e.kind(), &ErrorKind::Pagination, "{len}{ch}: {e}");
                    assert!(e.to_string().len() < 1000, "{len}{ch}: long message");
                }
            }
        }
    }
}

/// One page of `len()` items (read from `size` at each request) and no next page, whatever
/// was asked.
fn shrinking_api(
    size: Arc<AtomicUsize>,
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
        let n = size.load(Ordering::SeqCst);
        let body = match param(&req, "cursor").as_deref() {
            None => json!({ "data": (0..n).collect::<Vec<_>>(), "next": "p2" }),
            Some(_) => json!({ "data": [100, 101], "next": null }),
        };
        async move { Ok::<_, Infallible>(json_response(&body)) }
    })
}

#[tokio::test]
async fn agents27_a_page_that_shrank_since_the_cursor_was_made_never_panics() {
    for now in [0usize, 2, 3, 4] {
        let size = Arc::new(AtomicUsize::new(10));
        let pager = Paginate::builder(
            shrinking_api(size.clone()),
            "http://api.example.com/items",
            JsonCursor::new("/data", "/next").without_limit_param(),
        )
        .with_cursor_key(KEY)
        .build()
        .unwrap();
        let first = pager.page(None, 3).await.unwrap();
        assert_eq!(ids(&first), vec![0, 1, 2]);
        size.store(now, Ordering::SeqCst);
        let cursor = first.next_cursor.unwrap();
        let pager2 = pager.clone();
        let r = tokio::spawn(async move { pager2.page(Some(&cursor), 3).await })
            .await
            .unwrap_or_else(|e| panic!("page() panicked when the page shrank to {now}: {e}"));
        match r {
            Ok(p) => {
                // Nothing before the resume point comes back.
                assert!(
                    ids(&p).iter().all(|&i| i >= 3),
                    "shrank to {now}: {:?}",
                    ids(&p)
                );
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

#[tokio::test]
async fn agents27_server_ignoring_the_page_size_resumes_exactly() {
    let size = Arc::new(AtomicUsize::new(50));
    let pager = Paginate::builder(
        shrinking_api(size),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let got = walk_with_limits(&pager, &[5, 11, 1, 7]).await;
    let mut expected: Vec<u64> = (0..50).collect();
    expected.extend([100, 101]);
    assert_eq!(got, expected);
}
