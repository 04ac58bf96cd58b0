//! Outside tests of sturdy-paginate against docs/guides/paginate.md and the crate docs.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{Request, Response};
use http_body_util::Full;
use serde_json::{json, Value};
use sturdy::core::ErrorKind;
use sturdy::paginate::{JsonCursor, LinkHeader, OffsetLimit, PageNumber, Paginate, MAX_CURSOR_LEN};

type Hits = Arc<Mutex<Vec<String>>>;

fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

/// A cursor API over `n` items; `cursor_of(end)` gives the next cursor for a page ending at
/// `end` (None on the last page: `last` is used instead).
fn cursor_api(
    n: usize,
    per: usize,
    last: Value,
    hits: Hits,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        let hits = hits.clone();
        let last = last.clone();
        async move {
            hits.lock().unwrap().push(req.uri().to_string());
            let start = query_param(req.uri(), "cursor")
                .filter(|c| !c.is_empty())
                .map_or(0, |c| c.trim_start_matches('c').parse().unwrap_or(0));
            let end = (start + per).min(n);
            let next = if end < n {
                json!(format!("c{end}"))
            } else {
                last
            };
            let body =
                json!({ "data": (start..end).collect::<Vec<_>>(), "meta": { "next": next } });
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(body.to_string())))
        }
    })
}

#[tokio::test]
async fn empty_string_next_cursor_ends_the_walk() {
    // Slack's `response_metadata.next_cursor` is "" on the last page.
    let hits: Hits = Arc::default();
    let pager = Paginate::new(
        cursor_api(45, 20, json!(""), hits.clone()),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/meta/next"),
    )
    .unwrap();
    let all: Result<Vec<Value>, _> = pager.items().try_collect().await;
    let hits = hits.lock().unwrap().clone();
    eprintln!("requests: {hits:?}");
    let all = all.unwrap_or_else(|e| panic!("walk failed: {e}"));
    assert_eq!(all.len(), 45, "items: {all:?}");
    assert_eq!(hits.len(), 3);
}

#[tokio::test]
async fn null_and_missing_next_end_the_walk_and_numbers_are_cursors() {
    for last in [Value::Null, json!(false)] {
        let hits: Hits = Arc::default();
        let pager = Paginate::new(
            cursor_api(45, 20, last.clone(), hits.clone()),
            "http://api.example.com/items",
            JsonCursor::new("/data", "/meta/next"),
        )
        .unwrap();
        let all: Result<Vec<Value>, _> = pager.items().try_collect().await;
        eprintln!(
            "last {last}: {:?}",
            all.as_ref().map(Vec::len).map_err(ToString::to_string)
        );
    }
}

#[tokio::test]
async fn page_resumes_exactly_and_refuses_edited_cursors() {
    let hits: Hits = Arc::default();
    let pager = Paginate::new(
        cursor_api(45, 20, Value::Null, hits.clone()),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/meta/next"),
    )
    .unwrap();
    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let p = pager.page(cursor.as_deref(), 7).await.unwrap();
        assert!(p.items.len() <= 7);
        got.extend(p.items.iter().map(|v| v.as_u64().unwrap()));
        if !p.has_more {
            assert!(p.next_cursor.is_none());
            break;
        }
        cursor = p.next_cursor;
    }
    assert_eq!(got, (0..45).collect::<Vec<_>>());
    let c = pager.page(None, 7).await.unwrap().next_cursor.unwrap();
    let before = hits.lock().unwrap().len();
    let mut edited = c.clone().into_bytes();
    let i = edited.len() / 2;
    edited[i] = if edited[i] == b'A' { b'B' } else { b'A' };
    let edited = String::from_utf8(edited).unwrap();
    for bad in [
        edited.as_str(),
        "",
        "x",
        &c[..c.len() - 1],
        &format!("{c}A"),
        &"A".repeat(MAX_CURSOR_LEN + 10),
    ] {
        let e = pager.page(Some(bad), 7).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Pagination, "{bad:.30}: {e}");
    }
    assert_eq!(
        hits.lock().unwrap().len(),
        before,
        "a refused cursor sent a request"
    );
    // A cursor from another pager over the same URI is refused.
    let other = Paginate::new(
        cursor_api(45, 20, Value::Null, hits.clone()),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/meta/next"),
    )
    .unwrap();
    assert!(other.page(Some(&c), 7).await.is_err());
}

/// A server whose next cursor is long (the guide: a cursor is at most 16 KiB). A page() that
/// hands out a cursor it will itself refuse locks the agent out of the rest of the data.
#[tokio::test]
async fn a_long_server_cursor_does_not_lock_out_the_next_page() {
    let long = "c".repeat(20 * 1024);
    let api = {
        let long = long.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let long = long.clone();
            async move {
                let second = query_param(req.uri(), "cursor").is_some();
                let body = if second {
                    json!({ "data": [3, 4], "next": null })
                } else {
                    json!({ "data": [0, 1, 2], "next": long })
                };
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(body.to_string())))
            }
        })
    };
    let pager = Paginate::new(
        api,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let first = pager.page(None, 3).await;
    match first {
        Err(e) => eprintln!("first page with a 20 KiB server cursor: {e}"),
        Ok(p) => {
            assert!(p.has_more);
            let c = p.next_cursor.expect("has_more without a cursor");
            let second = pager.page(Some(&c), 3).await;
            assert!(
                second.is_ok(),
                "page() handed out a {}-byte cursor that it refuses: {}",
                c.len(),
                second.unwrap_err()
            );
        }
    }
}

#[tokio::test]
async fn link_header_relative_foreign_and_case() {
    let hits: Hits = Arc::default();
    let h = hits.clone();
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let h = h.clone();
        async move {
            let path = req.uri().path().to_owned();
            h.lock().unwrap().push(req.uri().to_string());
            let (items, link) = match path.as_str() {
                "/a" => (json!([1, 2]), Some(r#"</b?x=1>; rel="NEXT""#)),
                "/b" => (
                    json!([3]),
                    Some(r#"<c>; rel="prev next", <http://api.example.com/zzz>; rel="last""#),
                ),
                "/c" => (json!([4]), Some(r#"<http://evil.example.net/d>; rel=next"#)),
                _ => (json!([]), None),
            };
            let mut res = Response::builder();
            if let Some(l) = link {
                res = res.header("link", l);
            }
            Ok::<_, Infallible>(res.body(Full::<Bytes>::from(items.to_string())).unwrap())
        }
    });
    let pager = Paginate::new(api, "http://api.example.com/a", LinkHeader::new("")).unwrap();
    let mut items = Vec::new();
    let mut err = None;
    let mut s = pager.items();
    loop {
        match s.try_next().await {
            Ok(Some(v)) => items.push(v),
            Ok(None) => break,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    eprintln!(
        "items {items:?}, error {err:?}, hits {:?}",
        hits.lock().unwrap()
    );
    assert_eq!(items, vec![json!(1), json!(2), json!(3), json!(4)]);
    let err = err.expect("a foreign next link must end the walk with an error");
    assert_eq!(err.kind(), &ErrorKind::Pagination);
    assert!(!hits.lock().unwrap().iter().any(|u| u.contains("evil")));
}

#[tokio::test]
async fn hostile_link_headers_do_not_panic() {
    for link in [
        "<>; rel=next",
        "<javascript:alert(1)>; rel=next",
        "<//evil.example.net/x>; rel=next",
        "<http://[::1>; rel=next",
        "<<<<>>>>; rel=next",
        "; rel=next",
        "<http://api.example.com/a>; rel=next",
        &"<x>; rel=next, ".repeat(10_000),
        &format!("<x>; {}rel=next", "a=b; ".repeat(10_000)),
    ] {
        let link = link.to_owned();
        let api = tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let link = link.clone();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("link", link)
                        .body(Full::<Bytes>::from("[1]"))
                        .unwrap(),
                )
            }
        });
        let pager = Paginate::builder(api, "http://api.example.com/a", LinkHeader::new(""))
            .with_max_pages(5)
            .build()
            .unwrap();
        let r: Result<Vec<Value>, _> = pager.items().try_collect().await;
        let _ = r;
    }
}

#[tokio::test]
async fn page_number_and_offset_strategies() {
    let n = 45;
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| async move {
        let page: usize = query_param(req.uri(), "page").map_or(1, |p| p.parse().unwrap());
        let per: usize = query_param(req.uri(), "per_page").map_or(20, |p| p.parse().unwrap());
        let offset: usize = query_param(req.uri(), "offset")
            .map_or((page - 1) * per.min(10), |p| p.parse().unwrap());
        let limit: usize = query_param(req.uri(), "limit")
            .map_or(per, |p| p.parse().unwrap())
            .min(10);
        let end = (offset + limit).min(n);
        let items: Vec<usize> = (offset.min(n)..end).collect();
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(
            json!({"items": items, "total": n}).to_string(),
        )))
    });
    let p = Paginate::new(
        api,
        "http://api.example.com/i",
        PageNumber::new("/items").with_total("/total"),
    )
    .unwrap();
    let all: Vec<Value> = p.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 45, "page numbers with a server cap of 10");
    let p = Paginate::new(
        api,
        "http://api.example.com/i",
        OffsetLimit::new("/items").with_total("/total"),
    )
    .unwrap();
    let all: Vec<Value> = p.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 45, "offset/limit with a server cap of 10");
    let all: Vec<u64> = all.iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(all, (0..45).collect::<Vec<_>>());
}

#[tokio::test]
async fn builder_reports_config_mistakes() {
    let api = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("[]")))
    });
    let cases = [
        Paginate::builder(api, "http://x/", JsonCursor::new("data", "/next"))
            .build()
            .err(),
        Paginate::builder(api, "/relative", JsonCursor::new("/data", "/next"))
            .build()
            .err(),
        Paginate::builder(api, "http://x/", JsonCursor::new("/data", "/next"))
            .with_max_pages(0)
            .build()
            .err(),
        Paginate::builder(api, "http://x/", JsonCursor::new("/data", "/next"))
            .with_max_items(0)
            .build()
            .err(),
        Paginate::builder(api, "http://x/", JsonCursor::new("/data", "/next"))
            .with_page_timeout(Duration::ZERO)
            .build()
            .err(),
        Paginate::builder(api, "http://x/", JsonCursor::new("/data", "/next"))
            .with_cursor_key([0u8; 31])
            .build()
            .err(),
        Paginate::builder(
            api,
            "http://x/",
            JsonCursor::new("/data", "/next").with_cursor_param(""),
        )
        .build()
        .err(),
        Paginate::builder(api, "http://x/", PageNumber::new("/i").with_page_size(0))
            .build()
            .err(),
        Paginate::builder(api, "http://x/", JsonCursor::new("/data", "/next"))
            .with_max_page_bytes(0)
            .build()
            .err(),
        Paginate::builder(api, "http://x/", JsonCursor::new("/data", "/next"))
            .with_page_size(0)
            .build()
            .err(),
    ];
    for (i, c) in cases.iter().enumerate() {
        let e = c
            .as_ref()
            .unwrap_or_else(|| panic!("case {i} was accepted"));
        assert_eq!(e.kind(), &ErrorKind::Config, "case {i}: {e}");
    }
}

#[tokio::test]
async fn a_walk_stops_at_max_items_after_yielding_the_items_before() {
    let hits: Hits = Arc::default();
    let pager = Paginate::builder(
        cursor_api(100, 20, Value::Null, hits.clone()),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/meta/next"),
    )
    .with_max_items(30)
    .build()
    .unwrap();
    let mut s = pager.items();
    let mut n = 0;
    let err = loop {
        match s.try_next().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("ended without the bound error"),
            Err(e) => break e,
        }
    };
    assert_eq!(n, 30);
    assert_eq!(err.kind(), &ErrorKind::Pagination);
    eprintln!("bound: {err}");
}

#[tokio::test(start_paused = true)]
async fn a_stalled_page_times_out() {
    let api = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        std::future::pending::<()>().await;
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("[]")))
    });
    let pager = Paginate::builder(api, "http://api.example.com/a", LinkHeader::new(""))
        .with_page_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let e = pager.page(None, 5).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(e.kind(), &ErrorKind::Timeout);
}

#[tokio::test]
async fn error_statuses_fail_with_their_kind() {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let api = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(404)
                    .body(Full::<Bytes>::from("{}"))
                    .unwrap(),
            )
        }
    });
    let pager =
        Paginate::new(api, "http://api.example.com/a", JsonCursor::new("/d", "/n")).unwrap();
    let e = pager.page(None, 5).await.unwrap_err();
    assert_eq!(
        e.kind(),
        &ErrorKind::Client(http::StatusCode::NOT_FOUND),
        "{e}"
    );
}

#[tokio::test]
async fn page_fetches_no_page_it_does_not_need() {
    let hits: Hits = Arc::default();
    let pager = Paginate::builder(
        cursor_api(100, 20, Value::Null, hits.clone()),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/meta/next"),
    )
    .with_page_size(20)
    .build()
    .unwrap();
    let p = pager.page(None, 20).await.unwrap();
    assert_eq!((p.items.len(), p.has_more), (20, true));
    assert_eq!(hits.lock().unwrap().len(), 1, "{:?}", hits.lock().unwrap());
    let p = pager.page(p.next_cursor.as_deref(), 30).await.unwrap();
    assert_eq!(p.items.first(), Some(&json!(20)));
    assert_eq!(p.items.len(), 30);
    assert_eq!(hits.lock().unwrap().len(), 3, "{:?}", hits.lock().unwrap());
}
