//! docs/guides/paginate.md and agents.md on cost: bounded pages for agent tools over huge
//! server pages (endless and oversized bodies, 100,000 and 1,000,000 items, one giant item,
//! deep nesting, a giant server cursor), the byte and item bounds enforced while reading, and
//! walks that fetch a page only when polled. A scripted hyper server on 127.0.0.1:0; time
//! bounds are generous.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use sturdy::core::ErrorKind;
use sturdy::paginate::{JsonCursor, Paginate, MAX_CURSOR_LEN};

use crate::mix32_util::*;

type Http = HyperClient<HttpConnector, Full<Bytes>>;

fn http() -> Http {
    HyperClient::builder(TokioExecutor::new()).build_http()
}

fn ints(range: std::ops::Range<usize>) -> String {
    let mut s = String::with_capacity(range.len() * 7);
    for (i, n) in range.enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&n.to_string());
    }
    s
}

fn query_param<'a>(pq: &'a str, name: &str) -> Option<&'a str> {
    let q = pq.split_once('?')?.1;
    q.split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// A server with one page holding `n` items (0..n) and no next cursor.
async fn one_page(n: usize) -> Scripted {
    let body = Bytes::from(format!(r#"{{"data":[{}],"next":null}}"#, ints(0..n)));
    scripted(move |_, _| {
        let body = body.clone();
        async move { respond(200, &[("content-type", "application/json")], body) }
    })
    .await
}

/// `total` items in server pages of `per` (whatever size is asked), the cursor the start.
async fn paged(total: usize, per: usize) -> Scripted {
    scripted(move |hit, _| async move {
        let start: usize =
            query_param(&hit.path_and_query, "cursor").map_or(0, |c| c.parse().unwrap());
        let end = (start + per).min(total);
        let next = if end < total {
            format!("\"{end}\"")
        } else {
            "null".into()
        };
        respond(
            200,
            &[("content-type", "application/json")],
            format!(r#"{{"data":[{}],"next":{next}}}"#, ints(start..end)),
        )
    })
    .await
}

fn body_error_kind(e: &sturdy::core::Error) -> ErrorKind {
    e.kind().clone()
}

/// paginate.md: `with_max_page_bytes`: "one page body; reading stops as soon as it goes past",
/// and "a server that ... streams forever cannot hang a walk". An endless body fails with kind
/// `Body` long before the page timeout, having read little more than the bound.
#[tokio::test]
async fn mix32_endless_page_body_stops_at_the_byte_bound() {
    let produced = Arc::new(AtomicUsize::new(0));
    let p2 = produced.clone();
    let s = scripted(move |_, _| {
        let produced = p2.clone();
        async move {
            let chunk = Bytes::from(",0".repeat(32 * 1024));
            let head = futures_util::stream::once(async {
                Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(b"{\"data\":[0")))
            });
            let rest = futures_util::stream::repeat_with(move || {
                produced.fetch_add(chunk.len(), Ordering::Relaxed);
                Ok(http_body::Frame::data(chunk.clone()))
            });
            http::Response::builder()
                .header("content-type", "application/json")
                .body(StreamBody::new(head.chain(rest)).boxed_unsync())
                .unwrap()
        }
    })
    .await;
    let pager = Paginate::builder(http(), &s.url("/items"), JsonCursor::new("/data", "/next"))
        .with_max_page_bytes(256 * 1024)
        .with_page_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let t = Instant::now();
    let err = within(60, pager.page(None, 10)).await.unwrap_err();
    assert_eq!(body_error_kind(&err), ErrorKind::Body, "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let err = within(60, pager.items().try_collect::<Vec<_>>())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Body, "{err}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    // Two reads of a 256 KiB bound: what the server produced is socket buffers, not the stream.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n = produced.load(Ordering::Relaxed);
    assert!(n < 64 * 1024 * 1024, "the server produced {n} bytes");
}

/// A page whose `Content-Length` already says it is past the byte bound, then stalls: the
/// bound is known to be exceeded from the head, so the call should fail with `Body` at once
/// rather than wait out the page timeout as `Timeout`.
#[tokio::test]
async fn mix32_declared_oversized_page_fails_as_body_without_waiting() {
    let s = scripted(|_, _| async {
        let first = futures_util::stream::once(async {
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(b"{\"data\":[")))
        });
        http::Response::builder()
            .header("content-type", "application/json")
            .header("content-length", (1u64 << 30).to_string())
            .body(StreamBody::new(first.chain(futures_util::stream::pending())).boxed_unsync())
            .unwrap()
    })
    .await;
    let pager = Paginate::builder(http(), &s.url("/items"), JsonCursor::new("/data", "/next"))
        .with_max_page_bytes(64 * 1024)
        .with_page_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let t = Instant::now();
    let err = within(30, pager.page(None, 10)).await.unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::Body,
        "{err} after {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// agents.md / paginate.md: a bounded page out of one server page of 100,000 items: `limit`
/// items, `has_more`, and a cursor that "resumes exactly after the last item returned, even
/// inside a server page". A limit of 0 reads as 1. The walk yields all 100,000 (the bound is
/// "more than" `max_items`).
#[tokio::test]
async fn mix32_bounded_pages_out_of_a_100k_item_server_page() {
    let s = one_page(100_000).await;
    let pager = Paginate::new(http(), &s.url("/items"), JsonCursor::new("/data", "/next")).unwrap();
    let t = Instant::now();
    let first = within(60, pager.page(None, 20)).await.unwrap();
    assert_eq!(
        first.items,
        (0..20).map(|n| serde_json::json!(n)).collect::<Vec<_>>()
    );
    assert!(first.has_more);
    let cursor = first.next_cursor.clone().unwrap();
    assert!(cursor.len() <= MAX_CURSOR_LEN);
    let second = within(60, pager.page(Some(&cursor), 20)).await.unwrap();
    assert_eq!(second.items[0], 20);
    assert_eq!(second.items.len(), 20);
    let one = within(60, pager.page(None, 0)).await.unwrap();
    assert_eq!(one.items, [serde_json::json!(0)]);
    // Near the end of the server page: the last 10, then nothing more.
    let most = within(60, pager.page(None, 99_990)).await.unwrap();
    assert_eq!(most.items.len(), 99_990);
    let tail = within(60, pager.page(most.next_cursor.as_deref(), 20))
        .await
        .unwrap();
    assert_eq!(tail.items.len(), 10);
    assert_eq!(tail.items[9], 99_999);
    assert!(!tail.has_more);
    assert_eq!(tail.next_cursor, None);
    assert_eq!(s.count(), 5, "one request per page() call");
    let all: Vec<serde_json::Value> = within(60, pager.items().try_collect()).await.unwrap();
    assert_eq!(all.len(), 100_000);
    assert!(t.elapsed() < Duration::from_secs(40), "{:?}", t.elapsed());
    // The bounded page serialises as is.
    let json = serde_json::to_value(&first).unwrap();
    assert_eq!(json["has_more"], true);
    assert_eq!(json["items"].as_array().unwrap().len(), 20);
}

/// paginate.md: "More than ... `max_items` items ends a walk with an error after the items
/// before the bound"; `with_max_items` is "the largest `limit` a `page()` call honours".
#[tokio::test]
async fn mix32_one_page_over_max_items() {
    let s = one_page(100_001).await;
    let pager = Paginate::new(http(), &s.url("/items"), JsonCursor::new("/data", "/next")).unwrap();
    let mut items = pager.items();
    let mut n = 0usize;
    let err = loop {
        match within(60, items.next()).await {
            Some(Ok(_)) => n += 1,
            Some(Err(e)) => break e,
            None => panic!("the walk ended without an error after {n} items"),
        }
    };
    assert_eq!(n, 100_000);
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    let page = within(60, pager.page(None, usize::MAX)).await.unwrap();
    assert_eq!(page.items.len(), 100_000);
    assert!(page.has_more);
    let rest = within(60, pager.page(page.next_cursor.as_deref(), usize::MAX))
        .await
        .unwrap();
    assert_eq!(rest.items, [serde_json::json!(100_000)]);
    assert!(!rest.has_more);
}

/// A 2 MB page of 1,000,000 tiny items under the default bounds: a bounded page of 10 comes
/// back (cost: one parse), and the walk stops at `max_items` with an error.
#[tokio::test]
async fn mix32_a_million_tiny_items_give_a_bounded_page() {
    let body = Bytes::from(format!(
        r#"{{"data":[{}0],"next":null}}"#,
        "0,".repeat(999_999)
    ));
    let s = scripted(move |_, _| {
        let body = body.clone();
        async move { respond(200, &[("content-type", "application/json")], body) }
    })
    .await;
    let pager = Paginate::new(http(), &s.url("/items"), JsonCursor::new("/data", "/next")).unwrap();
    let t = Instant::now();
    let page = within(60, pager.page(None, 10)).await.unwrap();
    assert_eq!(page.items.len(), 10);
    assert!(page.has_more);
    assert!(page.next_cursor.unwrap().len() <= MAX_CURSOR_LEN);
    let n = within(
        60,
        pager
            .items()
            .take_while(|r| std::future::ready(r.is_ok()))
            .count(),
    )
    .await;
    assert_eq!(n, 100_000);
    assert!(t.elapsed() < Duration::from_secs(40), "{:?}", t.elapsed());
}

/// One giant item: 20 MiB in one string is over the default 16 MiB page bound (kind `Body`);
/// with the bound raised it comes back whole.
#[tokio::test]
async fn mix32_one_giant_item() {
    let giant = "x".repeat(20 * 1024 * 1024);
    let body = Bytes::from(format!(r#"{{"data":["{giant}"],"next":null}}"#));
    drop(giant);
    let s = scripted(move |_, _| {
        let body = body.clone();
        async move { respond(200, &[("content-type", "application/json")], body) }
    })
    .await;
    let pager = Paginate::new(http(), &s.url("/items"), JsonCursor::new("/data", "/next")).unwrap();
    let err = within(60, pager.page(None, 1)).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Body, "{err}");
    let pager = Paginate::builder(http(), &s.url("/items"), JsonCursor::new("/data", "/next"))
        .with_max_page_bytes(21 * 1024 * 1024)
        .build()
        .unwrap();
    let page = within(60, pager.page(None, 1)).await.unwrap();
    assert_eq!(page.items[0].as_str().unwrap().len(), 20 * 1024 * 1024);
    assert!(!page.has_more);
}

/// paginate.md: "A page that is not the expected JSON is named by its number" (kind
/// `Pagination`): 100,000 nested arrays end in that error, not a stack overflow.
#[tokio::test]
async fn mix32_deeply_nested_page_is_a_pagination_error() {
    let depth = 100_000;
    let body = Bytes::from(format!(
        r#"{{"data":[{}{}],"next":null}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    ));
    let s = scripted(move |_, _| {
        let body = body.clone();
        async move { respond(200, &[("content-type", "application/json")], body) }
    })
    .await;
    let pager = Paginate::new(http(), &s.url("/items"), JsonCursor::new("/data", "/next")).unwrap();
    let err = within(60, pager.page(None, 5)).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    assert!(err.to_string().contains('1'), "names page 1: {err}");
    assert!(err.to_string().len() < 1000, "{err}");
}

/// The crate docs: walks "fetch the next page only when polled"; agents.md: `page()` fetches
/// "no page that was not needed".
#[tokio::test]
async fn mix32_walks_and_bounded_pages_fetch_only_what_is_needed() {
    let s = paged(500, 100).await;
    let pager = Paginate::new(http(), &s.url("/items"), JsonCursor::new("/data", "/next")).unwrap();
    let mut items = pager.items();
    for _ in 0..100 {
        within(10, items.next()).await.unwrap().unwrap();
    }
    assert_eq!(s.count(), 1, "no page fetched ahead");
    within(10, items.next()).await.unwrap().unwrap();
    assert_eq!(s.count(), 2);
    drop(items);
    let before = s.count();
    let p = within(10, pager.page(None, 100)).await.unwrap();
    assert_eq!(p.items.len(), 100);
    assert!(p.has_more);
    assert_eq!(
        s.count() - before,
        1,
        "a limit that a page fills: one request"
    );
    let before = s.count();
    let q = within(10, pager.page(p.next_cursor.as_deref(), 100))
        .await
        .unwrap();
    assert_eq!(q.items[0], 100);
    assert_eq!(
        s.count() - before,
        1,
        "resuming at a page boundary: one request"
    );
    let before = s.count();
    let r = within(10, pager.page(None, 150)).await.unwrap();
    assert_eq!(r.items.len(), 150);
    assert_eq!(s.count() - before, 2);
}

/// agents.md: "Hand `next_cursor` to the model; it passes it back in the next call", and a
/// cursor is at most 16 KiB. A server whose next cursor is 20,000 characters must give either a
/// cursor `page()` takes back, or an error: never a cursor the next call refuses.
#[tokio::test]
async fn mix32_a_giant_server_cursor_gives_a_usable_cursor_or_an_error() {
    let big = "c".repeat(20_000);
    let s = scripted(move |hit, _| {
        let big = big.clone();
        async move {
            let second = query_param(&hit.path_and_query, "cursor").is_some();
            let body = if second {
                r#"{"data":[100,101],"next":null}"#.to_owned()
            } else {
                format!(r#"{{"data":[{}],"next":"{big}"}}"#, ints(0..100))
            };
            respond(200, &[("content-type", "application/json")], body)
        }
    })
    .await;
    let pager = Paginate::new(http(), &s.url("/items"), JsonCursor::new("/data", "/next")).unwrap();
    match within(10, pager.page(None, 100)).await {
        Err(e) => assert_eq!(e.kind(), &ErrorKind::Pagination, "{e}"),
        Ok(p) => {
            let c = p.next_cursor.expect("has_more needs a cursor");
            let next = within(10, pager.page(Some(&c), 100)).await;
            let next = next.unwrap_or_else(|e| {
                panic!(
                    "page() refuses the cursor it returned ({} chars): {e}",
                    c.len()
                )
            });
            assert_eq!(next.items, [serde_json::json!(100), serde_json::json!(101)]);
        }
    }
}

/// paginate.md: "More than `max_pages` pages ... ends a walk with an error after the items
/// before the bound"; the walk does not fetch past the bound.
#[tokio::test]
async fn mix32_max_pages_ends_a_walk_without_fetching_far_past_it() {
    let s = paged(1_000, 1).await;
    let pager = Paginate::builder(http(), &s.url("/items"), JsonCursor::new("/data", "/next"))
        .with_max_pages(10)
        .build()
        .unwrap();
    let got: Vec<Result<serde_json::Value, sturdy::core::Error>> =
        within(30, pager.items().collect()).await;
    let oks = got.iter().filter(|r| r.is_ok()).count();
    assert_eq!(oks, 10);
    assert_eq!(
        got.last().unwrap().as_ref().unwrap_err().kind(),
        &ErrorKind::Pagination
    );
    assert!(s.count() <= 11, "{}", s.count());
    let err = within(30, pager.page(None, 50)).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
}

/// A stream of pages that is dropped mid-body frees the connection's read: a second walk
/// with a fresh client succeeds promptly (nothing held).
#[tokio::test]
async fn mix32_dropping_a_walk_mid_page_holds_nothing() {
    let slow = scripted(|_, _| async {
        let chunks = futures_util::stream::iter(0..).then(|_| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(b" ")))
        });
        let head = futures_util::stream::once(async {
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(b"{\"data\":[1]")))
        });
        http::Response::builder()
            .body(StreamBody::new(head.chain(chunks)).boxed_unsync())
            .unwrap()
    })
    .await;
    let pager = Paginate::new(
        http(),
        &slow.url("/items"),
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let mut items = pager.items();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), items.next())
            .await
            .is_err()
    );
    drop(items);
    let fut = pager.page(None, 1);
    drop(fut);
    let ok = paged(3, 3).await;
    let pager2 =
        Paginate::new(http(), &ok.url("/items"), JsonCursor::new("/data", "/next")).unwrap();
    let all: Vec<serde_json::Value> = within(10, pager2.items().try_collect()).await.unwrap();
    assert_eq!(all.len(), 3);
}
