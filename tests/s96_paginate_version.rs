#![cfg(feature = "full")]
//! Outside round s96: pagination (`sturdy::paginate`), API version pinning (`sturdy::version`)
//! and the agent helpers (`ErrorSummary`, `tool_result`, `BoundedPage` and its cursors), tested
//! only through the public API against in-process services that misbehave (error pages with a
//! wait, foreign and relative links across origins, cursors crossing pagers and strategies,
//! bounds at 1 and `usize::MAX`, lying body sizes, stalls under tower's own layers) and a real
//! json-server 0.17 started on loopback.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::{Frame, SizeHint};
use serde_json::{json, Value};
use sturdy::core::summary::{tool_result, ErrorSummary};
use sturdy::core::{BoxError, ErrorKind};
use sturdy::paginate::{JsonCursor, LinkHeader, OffsetLimit, Paginate};
use sturdy::version::{Notice, VersionLayer};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

const KEY: &[u8] = b"s96-a-shared-cursor-key-of-32-bytes-or-more";

type Log = Arc<Mutex<Vec<String>>>;

fn query_map(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[allow(clippy::needless_pass_by_value)]
fn json_resp(v: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::from(v.to_string()))
        .unwrap()
}

/// An in-process API: `f` answers each request URI; every URI is logged.
fn api<F>(
    log: Log,
    f: F,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static
where
    F: Fn(&Uri) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    service_fn(move |req: Request<Full<Bytes>>| {
        let log = log.clone();
        let f = f.clone();
        async move {
            log.lock().unwrap().push(req.uri().to_string());
            Ok::<_, Infallible>(f(req.uri()))
        }
    })
}

/// A JSON cursor API over `total` items: the cursor is the start index, pages of `?limit=`
/// (capped at `cap`).
fn cursor_answer(uri: &Uri, total: usize, cap: usize) -> Response<Full<Bytes>> {
    let q = query_map(uri);
    let start: usize = q.get("cursor").map_or(0, |c| c.parse().unwrap());
    let limit: usize = q
        .get("limit")
        .map_or(cap, |l| l.parse::<usize>().unwrap_or(cap));
    let end = start.saturating_add(limit.min(cap)).min(total);
    let next = if end < total {
        json!(end.to_string())
    } else {
        Value::Null
    };
    json_resp(json!({ "data": (start..end).collect::<Vec<_>>(), "next": next }))
}

fn nums(v: &[Value]) -> Vec<u64> {
    v.iter().map(|x| x.as_u64().unwrap()).collect()
}

async fn walk<P: sturdy::paginate::PageStrategy>(
    pager: &Paginate<P>,
) -> (Vec<Value>, Option<sturdy::core::Error>) {
    let mut s = pager.items();
    let mut items = Vec::new();
    while let Some(r) = s.next().await {
        match r {
            Ok(v) => items.push(v),
            Err(e) => return (items, Some(e)),
        }
    }
    (items, None)
}

fn summary_of(e: sturdy::core::Error) -> (ErrorSummary, Value) {
    let b: BoxError = Box::new(e);
    let s = ErrorSummary::of(&*b);
    (s, tool_result::<Value>(Err(b)))
}

// ---------------------------------------------------------------------------------------------
// Error pages and what an agent sees
// ---------------------------------------------------------------------------------------------

/// paginate.md: "a page that answered an error status fails with the kind of that status";
/// agents.md: `retry_after_ms` is set "when the server, a limiter or a breaker said when". A
/// page answered 429 with `Retry-After: 30` (no retry layer below the pager).
#[tokio::test]
async fn s96_a_429_page_with_retry_after_tells_the_agent_when() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| {
        if query_map(uri).contains_key("cursor") {
            Response::builder()
                .status(StatusCode::TOO_MANY_REQUESTS)
                .header("retry-after", "30")
                .body(Full::from("slow down"))
                .unwrap()
        } else {
            cursor_answer(uri, 50, 10)
        }
    });
    let pager = Paginate::new(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let err = pager.page(None, 15).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::RateLimited { .. }),
        "{:?}",
        err.kind()
    );
    let (s, out) = summary_of(err);
    assert_eq!(s.kind, "rate_limited");
    assert!(s.retryable);
    assert_eq!(s.retry_after_ms, Some(30_000), "{out}");
}

/// The same for a 503 with `Retry-After: 5`: kind `server_error`, status 503, retryable, and the
/// server's wait.
#[tokio::test]
async fn s96_a_503_page_with_retry_after_tells_the_agent_when() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| {
        if query_map(uri).contains_key("cursor") {
            Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header("retry-after", "5")
                .body(Full::from("down"))
                .unwrap()
        } else {
            cursor_answer(uri, 50, 10)
        }
    });
    let pager = Paginate::new(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let err = pager.page(None, 15).await.unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE)
    );
    let (s, out) = summary_of(err);
    assert_eq!(
        (s.kind, s.status, s.retryable),
        ("server_error", Some(503), true)
    );
    assert_eq!(s.retry_after_ms, Some(5_000), "{out}");
}

/// agents.md: "may have been processed" is false only when no attempt reached the server; a
/// forged cursor is "refused before any request is sent". Its summary says: pagination, not
/// retryable, not processed, and the advice does not tell the model to retry.
#[tokio::test]
async fn s96_a_refused_cursor_reads_as_not_sent_and_not_retryable() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| cursor_answer(uri, 50, 10));
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let first = pager.page(None, 5).await.unwrap();
    let c = first.next_cursor.unwrap();
    let n = log.lock().unwrap().len();
    // Flip one character in the middle.
    let mut bytes = c.into_bytes();
    let mid = bytes.len() / 2;
    bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bytes).unwrap();
    let err = pager.page(Some(&bad), 5).await.unwrap_err();
    assert_eq!(log.lock().unwrap().len(), n, "a request was sent");
    assert_eq!(err.kind(), &ErrorKind::Pagination);
    let (s, out) = summary_of(err);
    assert_eq!(s.kind, "pagination");
    assert!(!s.retryable);
    assert!(!s.may_have_been_processed);
    assert_eq!(s.retry_after_ms, None);
    let text = out["content"][0]["text"].as_str().unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.lines()
            .nth(1)
            .unwrap()
            .starts_with("Trying again unchanged will not help"),
        "{text}"
    );
    assert!(!text.contains(&bad), "the cursor is quoted back: {text}");
}

/// agents.md: "A value that cannot be written as JSON ... gives `isError: true` with a text that
/// says so, and no `structuredContent`" (summary.rs: "not a `null` result"). A NaN or an infinity
/// cannot be written as JSON.
#[test]
#[ignore = "DOCUMENTED since: agents.md and tool_result say a NaN or infinite float is written as null, as serde_json writes it"]
fn s96_a_nan_result_is_not_a_null_result() {
    for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let out = tool_result::<f64>(Ok(v));
        assert_eq!(out["isError"], true, "{v}: {out}");
        assert!(out.get("structuredContent").is_none(), "{v}: {out}");
        assert_ne!(out["content"][0]["text"], "null", "{v}: {out}");
    }
}

/// agents.md: on success "the text is the value as JSON (a string value as the string itself,
/// without quotes)" and `structuredContent` is `{"result": value}`, for the largest numbers and
/// a `BoundedPage` at its end.
#[test]
fn s96_success_texts_of_extreme_values_and_a_last_page() {
    let out = tool_result::<u64>(Ok(u64::MAX));
    assert_eq!(out["content"][0]["text"], "18446744073709551615");
    assert_eq!(out["structuredContent"]["result"], u64::MAX);
    assert_eq!(out["isError"], false);
    let out = tool_result::<i64>(Ok(i64::MIN));
    assert_eq!(out["content"][0]["text"], "-9223372036854775808");
    let out = tool_result::<String>(Ok("line1\n\"q\"\tend".into()));
    assert_eq!(out["content"][0]["text"], "line1\n\"q\"\tend");
    assert_eq!(out["structuredContent"]["result"], "line1\n\"q\"\tend");
    let page = sturdy::paginate::BoundedPage::<Value> {
        items: vec![],
        has_more: false,
        next_cursor: None,
    };
    let out = tool_result(Ok(page));
    let text: Value = serde_json::from_str(out["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(
        text,
        json!({"items": [], "has_more": false, "next_cursor": null})
    );
    assert_eq!(
        out["structuredContent"]["result"],
        json!({"items": [], "has_more": false, "next_cursor": null})
    );
}

// ---------------------------------------------------------------------------------------------
// Origins, links and cursors that cross pagers
// ---------------------------------------------------------------------------------------------

/// paginate.md: with `with_foreign_origin_allowed(true)` a walk may leave the first origin;
/// "relative links resolved" against the page's URI (the new origin's), and a next link back to
/// the first page (URI already fetched) ends with a loop error after that page's items.
#[tokio::test]
async fn s96_allowed_foreign_walk_resolves_on_the_new_origin_and_catches_the_way_back() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| {
        let host = uri.host().unwrap_or("");
        let (items, link): (Vec<u32>, Option<&str>) = match (host, uri.path()) {
            ("a.example", "/items") => (vec![1, 2], Some("<http://b.example:8080/x/p2>; rel=next")),
            ("b.example", "/x/p2") => (vec![3, 4], Some("<p3>; rel=\"next\"")),
            ("b.example", "/x/p3") => (vec![5], Some("<HTTP://A.EXAMPLE:80/items>; rel=next")),
            _ => (vec![999], None),
        };
        let mut r = json_resp(json!(items));
        if let Some(l) = link {
            r.headers_mut()
                .insert("link", HeaderValue::from_str(l).unwrap());
        }
        r
    });
    let pager = Paginate::builder(svc.clone(), "http://a.example/items", LinkHeader::new(""))
        .with_foreign_origin_allowed(true)
        .build()
        .unwrap();
    let (items, err) = walk(&pager).await;
    assert_eq!(nums(&items), [1, 2, 3, 4, 5]);
    let err = err.expect("a loop error");
    assert_eq!(err.kind(), &ErrorKind::Pagination);
    assert!(err.to_string().contains("loop"), "{err}");
    assert_eq!(
        *log.lock().unwrap(),
        [
            "http://a.example/items",
            "http://b.example:8080/x/p2",
            "http://b.example:8080/x/p3"
        ]
    );

    // Strict (the default): refused at the first foreign link, b.example never asked.
    log.lock().unwrap().clear();
    let strict = Paginate::new(svc, "http://a.example/items", LinkHeader::new("")).unwrap();
    let (items, err) = walk(&strict).await;
    assert_eq!(nums(&items), [1, 2]);
    assert_eq!(err.unwrap().kind(), &ErrorKind::Pagination);
    assert_eq!(*log.lock().unwrap(), ["http://a.example/items"]);
}

/// paginate.md: "A next link to another origin is refused unless
/// `.with_foreign_origin_allowed(true)`: the credentials the stack adds would follow it". A cursor
/// made by a permissive pager (same key, same URI) that leads to another origin is not a way
/// around the guard of a strict twin: no request reaches the other origin.
#[tokio::test]
async fn s96_a_strict_twin_refuses_a_cursor_that_leads_to_another_origin() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| {
        let host = uri.host().unwrap_or("");
        let (items, link): (Vec<u32>, Option<&str>) = match host {
            "a.example" => (vec![1, 2, 3], Some("<http://evil.example/steal>; rel=next")),
            _ => (vec![66, 67, 68], None),
        };
        let mut r = json_resp(json!(items));
        if let Some(l) = link {
            r.headers_mut()
                .insert("link", HeaderValue::from_str(l).unwrap());
        }
        r
    });
    let loose = Paginate::builder(svc.clone(), "http://a.example/items", LinkHeader::new(""))
        .with_foreign_origin_allowed(true)
        .with_cursor_key(KEY)
        .build()
        .unwrap();
    let strict = Paginate::builder(svc, "http://a.example/items", LinkHeader::new(""))
        .with_cursor_key(KEY)
        .build()
        .unwrap();
    // A cursor inside page 1, and one at the foreign page 2.
    let p = loose.page(None, 3).await.unwrap();
    assert_eq!(nums(&p.items), [1, 2, 3]);
    let at_foreign = p.next_cursor.unwrap();
    log.lock().unwrap().clear();
    let r = strict.page(Some(&at_foreign), 3).await;
    assert!(r.is_err(), "the strict pager read {:?}", r.unwrap().items);
    assert!(
        log.lock().unwrap().iter().all(|u| !u.contains("evil")),
        "{:?}",
        log.lock().unwrap()
    );
}

/// paginate.md: cursors are signed "over its content and the pager's URI". A JSON-cursor pager
/// whose server cursor happens to be a URL of another origin: a `LinkHeader` twin (same key, same
/// URI) given that cursor must not follow it to the other origin.
#[tokio::test]
async fn s96_a_json_cursor_that_is_a_foreign_url_never_becomes_a_followed_link() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| {
        if uri.host() == Some("evil.example") {
            return json_resp(json!([7, 7, 7]));
        }
        json_resp(json!({"data": [1, 2], "next": "http://evil.example/steal"}))
    });
    let json_pager = Paginate::builder(
        svc.clone(),
        "http://a.example/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let link_pager = Paginate::builder(svc, "http://a.example/items", LinkHeader::new(""))
        .with_cursor_key(KEY)
        .build()
        .unwrap();
    let p = json_pager.page(None, 2).await.unwrap();
    let c = p.next_cursor.unwrap();
    log.lock().unwrap().clear();
    let _ = link_pager.page(Some(&c), 2).await;
    assert!(
        log.lock().unwrap().iter().all(|u| !u.contains("evil")),
        "{:?}",
        log.lock().unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Failures mid-walk, empty pages and bounds
// ---------------------------------------------------------------------------------------------

/// paginate.md: "A `page()` call returns all its items or fails as a whole"; the page() docs:
/// "Fetches only the pages needed". A call whose second page fails, retried with the same
/// cursor, returns exactly the items it would have, and the retry fetches only what is needed.
#[tokio::test]
async fn s96_retrying_a_failed_page_call_fetches_only_what_it_needs() {
    let log: Log = Default::default();
    let fail_next = Arc::new(Mutex::new(true));
    let f = fail_next.clone();
    let svc = api(log.clone(), move |uri| {
        let q = query_map(uri);
        if q.get("cursor").map(String::as_str) == Some("20")
            && std::mem::take(&mut *f.lock().unwrap())
        {
            return Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Full::from("x"))
                .unwrap();
        }
        cursor_answer(uri, 45, 10)
    });
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(10)
    .build()
    .unwrap();
    let first = pager.page(None, 15).await.unwrap();
    assert_eq!(nums(&first.items), (0..15).collect::<Vec<_>>());
    let c = first.next_cursor.unwrap();
    log.lock().unwrap().clear();
    // Needs items 15..27: the rest of page 2 (cursor 10), then page 3 (cursor 20) fails.
    let err = pager.page(Some(&c), 12).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Server(StatusCode::BAD_GATEWAY));
    assert!(err.to_string().contains("page 2"), "{err}");
    let again = pager.page(Some(&c), 12).await.unwrap();
    assert_eq!(nums(&again.items), (15..27).collect::<Vec<_>>());
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 4, "{log:?}");
    // And the rest, once each.
    let mut all = nums(&first.items);
    all.extend(nums(&again.items));
    let mut cur = again.next_cursor;
    while let Some(c) = cur {
        let p = pager.page(Some(&c), 7).await.unwrap();
        all.extend(nums(&p.items));
        cur = p.next_cursor;
        assert_eq!(p.has_more, cur.is_some());
    }
    assert_eq!(all, (0..45).collect::<Vec<_>>());
}

/// paginate.md: "One call reads at most `max_pages` pages"; "a `page()` call that needs more
/// than `max_pages` pages fails". Endless empty pages with next cursors: the call fails having
/// sent exactly `max_pages` requests (at 1 and at 3), never hanging.
#[tokio::test]
async fn s96_endless_empty_pages_in_a_page_call_stop_at_max_pages_requests() {
    for max in [1usize, 3] {
        let log: Log = Default::default();
        let svc = api(log.clone(), |uri| {
            let q = query_map(uri);
            let n: u64 = q.get("cursor").map_or(0, |c| c.parse().unwrap());
            json_resp(json!({"data": [], "next": (n + 1).to_string()}))
        });
        let pager = Paginate::builder(
            svc,
            "http://api.example.com/items",
            JsonCursor::new("/data", "/next"),
        )
        .with_max_pages(max)
        .build()
        .unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), pager.page(None, 5))
            .await
            .expect("hung")
            .unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
        assert_eq!(log.lock().unwrap().len(), max, "max_pages {max}");
        // The walk: the same bound.
        log.lock().unwrap().clear();
        let (items, err) = walk(&pager).await;
        assert!(items.is_empty());
        assert_eq!(err.unwrap().kind(), &ErrorKind::Pagination);
        assert_eq!(log.lock().unwrap().len(), max, "walk, max_pages {max}");
    }
}

/// The `page()` docs: "one above `with_max_items` as that bound". With `usize::MAX` bounds and a
/// `usize::MAX` limit, a server page of 120,000 items (it ignores the page size) comes back in
/// one call from a cursor inside it, and a default pager honours at most 100,000 of them and
/// resumes exactly after.
#[tokio::test]
async fn s96_usize_max_bounds_and_limits_over_a_huge_page() {
    const N: usize = 120_000;
    let big = Arc::new(json!({ "data": (0..N).collect::<Vec<_>>(), "next": null }).to_string());
    let log: Log = Default::default();
    let b = big.clone();
    let svc = api(log.clone(), move |_| json_resp_raw(&b));
    let pager = Paginate::builder(
        svc.clone(),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_items(usize::MAX)
    .with_max_pages(usize::MAX)
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let first = pager.page(None, 3).await.unwrap();
    assert_eq!(nums(&first.items), [0, 1, 2]);
    let rest = pager
        .page(first.next_cursor.as_deref(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(rest.items.len(), N - 3);
    assert_eq!(rest.items[0], 3);
    assert!(!rest.has_more);
    assert_eq!(rest.next_cursor, None);

    let default = Paginate::builder(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let a = default
        .page(first.next_cursor.as_deref(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(a.items.len(), 100_000);
    assert!(a.has_more);
    let b = default
        .page(a.next_cursor.as_deref(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(b.items.first(), Some(&json!(100_003)));
    assert_eq!(b.items.len(), N - 100_003);
    assert!(!b.has_more);

    // Walks: all of it under `usize::MAX`; the first 100,000 and then an error by default.
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(items.len(), N);
    let (items, err) = walk(&default).await;
    assert_eq!(items.len(), 100_000);
    assert_eq!(items.last(), Some(&json!(99_999)));
    assert_eq!(err.unwrap().kind(), &ErrorKind::Pagination);
}

fn json_resp_raw(s: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::from(s.to_owned()))
        .unwrap()
}

/// paginate.md: `OffsetLimit` "(with `.with_total("/total")` when the server may cap the page
/// size)"; "the cursor is opaque and resumes exactly after the last item returned, even inside a
/// server page". With a page size of `usize::MAX` asked of a server that caps pages at 7.
#[tokio::test]
async fn s96_offset_limit_at_a_usize_max_page_size_resumes_exactly() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| {
        let q = query_map(uri);
        let off: usize = q["offset"].parse().unwrap();
        let lim: usize = q["limit"].parse().unwrap();
        let end = off.saturating_add(lim.min(7)).min(40);
        let start = off.min(40);
        json_resp(json!({"rows": (start..end).collect::<Vec<_>>(), "total": 40}))
    });
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/rows",
        OffsetLimit::new("/rows").with_total("/total"),
    )
    .with_page_size(usize::MAX)
    .build()
    .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(nums(&items), (0..40).collect::<Vec<_>>());
    let mut all = Vec::new();
    let mut cur: Option<String> = None;
    for lim in [3usize, 1, 9, 4, 100, 2].iter().cycle() {
        let p = pager.page(cur.as_deref(), *lim).await.unwrap();
        all.extend(nums(&p.items));
        cur = p.next_cursor;
        if cur.is_none() {
            break;
        }
    }
    assert_eq!(all, (0..40).collect::<Vec<_>>());
}

/// A walk bounded at one page (`with_max_pages(1)`) that has a next link: the items of page 1,
/// then an error, and page 2 is never requested ("pages per walk").
#[tokio::test]
async fn s96_max_pages_one_never_requests_page_two() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| cursor_answer(uri, 30, 10));
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_pages(1)
    .with_max_items(1)
    .build()
    .unwrap();
    let (items, err) = walk(&pager).await;
    assert_eq!(nums(&items), [0]);
    assert_eq!(err.unwrap().kind(), &ErrorKind::Pagination);
    assert_eq!(log.lock().unwrap().len(), 1);
    let p = pager.page(None, 10).await.unwrap();
    assert_eq!((nums(&p.items), p.has_more), (vec![0], true));
    let q = pager.page(p.next_cursor.as_deref(), 0).await.unwrap();
    assert_eq!(nums(&q.items), [1]);
}

/// A body whose size hint claims a terabyte (it holds two bytes), read with the page limit at
/// `usize::MAX`: the page is read by its bytes, nothing is allocated for the claim, no panic.
#[tokio::test]
async fn s96_a_lying_size_hint_under_an_unbounded_page_limit() {
    #[derive(Default)]
    struct Liar(Option<Bytes>);
    impl hyper::body::Body for Liar {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
        }
        fn size_hint(&self) -> SizeHint {
            let mut h = SizeHint::new();
            h.set_lower(1 << 40);
            h
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_none()
        }
    }
    let svc = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Liar(Some(Bytes::from_static(b"[1,2]")))))
    });
    let pager = Paginate::builder(svc, "http://api.example.com/items", LinkHeader::new(""))
        .with_max_page_bytes(usize::MAX)
        .build()
        .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(nums(&items), [1, 2]);
}

/// README: every layer "can sit under a `Buffer` or over a `ConcurrencyLimit`"; paginate.md: the
/// page timeout covers "the response head and the whole body". A pager over
/// Buffer -> ConcurrencyLimit(1) -> Timeout whose page 2 never answers: the walk ends with kind
/// `Timeout` (tower's `Elapsed` read as a timeout), the agent is told it may retry, and the one
/// slot is free again for the next walk.
#[tokio::test(start_paused = true)]
async fn s96_a_stalled_page_under_buffer_limit_and_timeout_frees_the_slot() {
    let stall = Arc::new(Mutex::new(true));
    let st = stall.clone();
    let inner = service_fn(move |req: Request<Full<Bytes>>| {
        let st = st.clone();
        async move {
            let stalled = query_map(req.uri()).contains_key("cursor") && *st.lock().unwrap();
            if stalled {
                std::future::pending::<()>().await;
            }
            Ok::<_, Infallible>(cursor_answer(req.uri(), 25, 10))
        }
    });
    let svc = ServiceBuilder::new()
        .buffer(8)
        .concurrency_limit(1)
        .timeout(Duration::from_secs(2))
        .service(inner);
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_timeout(Duration::from_secs(10))
    .build()
    .unwrap();
    let (items, err) = walk(&pager).await;
    assert_eq!(items.len(), 10);
    let err = err.unwrap();
    assert_eq!(err.kind(), &ErrorKind::Timeout, "{err}");
    let (s, _) = summary_of(err);
    assert_eq!(s.kind, "timeout");
    assert!(s.retryable);
    *stall.lock().unwrap() = false;
    let (items, err) = tokio::time::timeout(Duration::from_secs(1), walk(&pager))
        .await
        .expect("the slot was kept");
    assert!(err.is_none());
    assert_eq!(items.len(), 25);
}

/// A page timeout of `Duration::MAX` (RELIABILITY.md: durations set to `Duration::MAX` are "read
/// as about 30 years from now; never a panic").
#[tokio::test(start_paused = true)]
async fn s96_a_page_timeout_of_duration_max_never_panics() {
    let log: Log = Default::default();
    let svc = api(log, |uri| cursor_answer(uri, 25, 10));
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_timeout(Duration::MAX)
    .build()
    .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none());
    assert_eq!(items.len(), 25);
    assert_eq!(pager.page(None, 3).await.unwrap().items.len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Version pins and notices
// ---------------------------------------------------------------------------------------------

fn recorder() -> (
    Arc<Mutex<Vec<Notice>>>,
    impl Fn(&Notice) + Send + Sync + 'static,
) {
    let seen: Arc<Mutex<Vec<Notice>>> = Default::default();
    let s = seen.clone();
    (seen, move |n: &Notice| s.lock().unwrap().push(n.clone()))
}

fn at(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

async fn notice_for(deprecation: Option<&str>, sunset: Option<&str>) -> Vec<Notice> {
    let (seen, f) = recorder();
    let dep = deprecation.map(str::to_owned);
    let sun = sunset.map(str::to_owned);
    let api = service_fn(move |_req: Request<()>| {
        let dep = dep.clone();
        let sun = sun.clone();
        async move {
            let mut b = Response::builder();
            if let Some(d) = dep {
                b = b.header(
                    "deprecation",
                    HeaderValue::from_bytes(d.as_bytes()).unwrap(),
                );
            }
            if let Some(s) = sun {
                b = b.header("sunset", HeaderValue::from_bytes(s.as_bytes()).unwrap());
            }
            Ok::<_, Infallible>(b.body(()).unwrap())
        }
    });
    let svc = VersionLayer::header("api-version", "1")
        .unwrap()
        .on_notice(f)
        .layer(api);
    svc.oneshot(
        Request::get("http://api.example.com/v1/x")
            .body(())
            .unwrap(),
    )
    .await
    .unwrap();
    let v = seen.lock().unwrap().clone();
    v
}

/// version.md / the crate docs: `Deprecation` in its RFC 9745 form `@<unix>`. RFC 9745 makes it
/// an Item structured field (RFC 8941), so parameters may follow the date (`@1688169599;x=1`) and
/// the integer may be negative (before 1970 is "that date").
#[tokio::test]
async fn s96_deprecation_sf_date_with_parameters_is_that_date() {
    let n = notice_for(Some("@1688169599;source=\"policy\""), None).await;
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].deprecation, Some(Some(at(1_688_169_599))));
    let n = notice_for(Some("@-86400"), None).await;
    assert_eq!(n[0].deprecation, Some(Some(at(-86_400))));
    let n = notice_for(Some("@0"), None).await;
    assert_eq!(n[0].deprecation, Some(Some(UNIX_EPOCH)));
}

/// Malformed `Deprecation` values are not some other date: a decimal, a bare `@`, a sign with no
/// digits, text, and a list are never reported as a date they do not say (ignored, or at most
/// "deprecated, date unknown"), and the response is untouched.
#[tokio::test]
async fn s96_malformed_deprecation_is_never_a_wrong_date() {
    for bad in [
        "@1.5",
        "@",
        "@-",
        "@abc",
        "@ 1688169599",
        "@1688169599abc",
        "1688169599",
        "@1688169599, @1",
        "@99999999999999999999999",
        "@-99999999999999999999999",
    ] {
        let n = notice_for(Some(bad), None).await;
        for notice in &n {
            assert!(
                matches!(notice.deprecation, None | Some(None)),
                "{bad:?} read as {:?}",
                notice.deprecation
            );
        }
    }
}

/// The crate docs: `Sunset` is "an HTTP date, read leniently". A `Sunset` that is not a date at
/// all is ignored (RELIABILITY.md: "ignored, as any malformed `Sunset`"), and a well-formed date
/// next to it in a `Deprecation` still counts.
#[tokio::test]
async fn s96_malformed_sunset_is_ignored_and_a_good_deprecation_still_counts() {
    for bad in [
        "soon",
        "",
        "Sat, 31 Feb 2024 25:61:61 GMT",
        "@1688169599",
        "0",
    ] {
        let n = notice_for(None, Some(bad)).await;
        assert!(n.iter().all(|x| x.sunset.is_none()), "{bad:?}: {n:?}");
        let n = notice_for(Some("@1688169599"), Some(bad)).await;
        assert_eq!(n.len(), 1, "{bad:?}");
        assert_eq!(n[0].deprecation, Some(Some(at(1_688_169_599))));
        assert_eq!(n[0].sunset, None, "{bad:?}");
    }
}

/// version.md: the query pin "cannot fail" and a URI that cannot hold it is sent without it. A
/// `CONNECT` in authority form and an `OPTIONS *` have no query to add to: they pass through
/// untouched, no panic; the header pin sets the header on them.
#[tokio::test]
async fn s96_version_pins_on_authority_and_asterisk_forms() {
    let seen: Arc<Mutex<Vec<(String, Option<String>)>>> = Default::default();
    let s = seen.clone();
    let api = service_fn(move |req: Request<()>| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push((
                req.uri().to_string(),
                req.headers()
                    .get("api-version")
                    .map(|v| v.to_str().unwrap().to_owned()),
            ));
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    let q = VersionLayer::query("api-version", "2024-06-01").layer(api.clone());
    let h = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .layer(api);
    let connect = || {
        Request::builder()
            .method("CONNECT")
            .uri("api.example.com:443")
            .body(())
            .unwrap()
    };
    let star = || {
        Request::builder()
            .method("OPTIONS")
            .uri("*")
            .body(())
            .unwrap()
    };
    q.clone().oneshot(connect()).await.unwrap();
    q.oneshot(star()).await.unwrap();
    h.clone().oneshot(connect()).await.unwrap();
    h.oneshot(star()).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].0, "api.example.com:443");
    assert_eq!(seen[1].0, "*");
    assert_eq!(seen[2].1.as_deref(), Some("2024-06-01"));
    assert_eq!(seen[3].1.as_deref(), Some("2024-06-01"));
}

/// version.md: "a version the caller set is kept". A caller's own header version that is empty,
/// and a caller's own query parameter written without `=`, are still the caller's.
#[tokio::test]
async fn s96_a_callers_empty_version_is_still_the_callers() {
    let seen: Arc<Mutex<Vec<(String, Vec<String>)>>> = Default::default();
    let s = seen.clone();
    let api = service_fn(move |req: Request<()>| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push((
                req.uri().to_string(),
                req.headers()
                    .get_all("api-version")
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect(),
            ));
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    let h = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .layer(api.clone());
    h.oneshot(
        Request::get("http://api.example.com/v1")
            .header("api-version", "")
            .body(())
            .unwrap(),
    )
    .await
    .unwrap();
    let q = VersionLayer::query("api-version", "2024-06-01").layer(api);
    q.clone()
        .oneshot(
            Request::get("http://api.example.com/v1?api-version=")
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    q.oneshot(
        Request::get("http://api.example.com/v1?api-version")
            .body(())
            .unwrap(),
    )
    .await
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].1, [""], "header: {seen:?}");
    assert_eq!(
        seen[1].0, "http://api.example.com/v1?api-version=",
        "{seen:?}"
    );
    assert_eq!(
        seen[2].0, "http://api.example.com/v1?api-version",
        "{seen:?}"
    );
}

/// version.md: "An endpoint is the method and the path, ids included": the same path on two
/// hosts, and in absolute and origin form, is one endpoint (reported once), while `HEAD` and
/// `GET` of one path are two.
#[tokio::test]
async fn s96_an_endpoint_is_method_and_path_only() {
    let (seen, f) = recorder();
    let api = service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("deprecation", "@1688169599")
                .body(())
                .unwrap(),
        )
    });
    let svc = VersionLayer::query("v", "1").on_notice(f).layer(api);
    for (m, u) in [
        ("GET", "http://a.example/v1/x"),
        ("GET", "http://b.example:8443/v1/x?q=1"),
        ("GET", "/v1/x"),
        ("HEAD", "http://a.example/v1/x"),
    ] {
        svc.clone()
            .oneshot(Request::builder().method(m).uri(u).body(()).unwrap())
            .await
            .unwrap();
    }
    let eps: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|n| n.endpoint.clone())
        .collect();
    assert_eq!(eps, ["GET /v1/x", "HEAD /v1/x"]);
}

// ---------------------------------------------------------------------------------------------
// A real json-server 0.17
// ---------------------------------------------------------------------------------------------

struct JsonServer {
    child: std::process::Child,
    base: String,
    _dir: std::path::PathBuf,
}

impl Drop for JsonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

async fn json_server(n: usize) -> Option<JsonServer> {
    let node_dir = std::env::var("STURDY_INTEROP_NODE_DIR").ok()?;
    let bin = std::path::Path::new(&node_dir).join("node_modules/json-server/lib/cli/bin.js");
    if !bin.exists() {
        eprintln!("skip: no json-server at {}", bin.display());
        return None;
    }
    let dir = std::env::temp_dir().join(format!("s96-json-server-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let items: Vec<Value> = (1..=n)
        .map(|i| json!({"id": i, "name": format!("item {i}")}))
        .collect();
    std::fs::write(dir.join("db.json"), json!({ "items": items }).to_string()).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = std::process::Command::new("node")
        .arg(&bin)
        .arg("--port")
        .arg(port.to_string())
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--quiet")
        .arg(dir.join("db.json"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let srv = JsonServer {
        child,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Some(srv);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("json-server did not start");
}

fn hyper_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

fn ids(v: &[Value]) -> Vec<u64> {
    v.iter().map(|x| x["id"].as_u64().unwrap()).collect()
}

/// json-server's own `Link` (first/prev/next/last, absolute) under a query version pin: a walk
/// from page 1 reads every item once; a walk that starts past the last page reads nothing and
/// ends cleanly; bounded pages with `_limit` as the page-size parameter resume exactly for
/// seeded limits, the pin on every request kept once.
#[tokio::test]
async fn s96_json_server_link_walks_and_bounded_pages_with_a_version_pin() {
    let Some(js) = json_server(37).await else {
        return;
    };
    let client = ServiceBuilder::new()
        .layer(VersionLayer::query("v", "2024-06-01"))
        .service(hyper_client());
    let pager = Paginate::new(
        client.clone(),
        &format!("{}/items?_page=1&_limit=5", js.base),
        LinkHeader::new(""),
    )
    .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(ids(&items), (1..=37).collect::<Vec<_>>());

    let past = Paginate::new(
        client.clone(),
        &format!("{}/items?_page=99&_limit=5", js.base),
        LinkHeader::new(""),
    )
    .unwrap();
    let (items, err) = walk(&past).await;
    assert!(err.is_none(), "{err:?}");
    assert!(items.is_empty());
    let p = past.page(None, 5).await.unwrap();
    assert_eq!((p.items.len(), p.has_more, p.next_cursor), (0, false, None));

    let bounded = Paginate::builder(
        client,
        &format!("{}/items?_page=1", js.base),
        LinkHeader::new("").with_limit_param("_limit"),
    )
    .with_page_size(6)
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let mut seed: u64 = 96;
    let mut all = Vec::new();
    let mut cur: Option<String> = None;
    for _ in 0..100 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let lim = (seed >> 33) as usize % 9;
        let p = bounded.page(cur.as_deref(), lim).await.unwrap();
        assert!(p.items.len() <= lim.max(1));
        all.extend(ids(&p.items));
        assert_eq!(p.has_more, p.next_cursor.is_some());
        cur = p.next_cursor;
        if cur.is_none() {
            break;
        }
    }
    assert_eq!(all, (1..=37).collect::<Vec<_>>());
}

/// json-server: an item deleted between two bounded pages (the pages shrink under the walk).
/// Nothing panics, no item is returned twice, and the walk ends.
#[tokio::test]
async fn s96_json_server_pages_shrinking_between_calls() {
    let Some(js) = json_server(20).await else {
        return;
    };
    let client = hyper_client();
    let pager = Paginate::builder(
        client.clone(),
        &format!("{}/items?_page=1", js.base),
        LinkHeader::new("").with_limit_param("_limit"),
    )
    .with_page_size(5)
    .build()
    .unwrap();
    let first = pager.page(None, 7).await.unwrap();
    assert_eq!(ids(&first.items), (1..=7).collect::<Vec<_>>());
    // Delete items 2 and 9.
    for id in [2, 9] {
        let req = Request::delete(format!("{}/items/{id}", js.base))
            .body(Full::default())
            .unwrap();
        let r = client.clone().oneshot(req).await.unwrap();
        assert!(r.status().is_success());
    }
    let mut all = ids(&first.items);
    let mut cur = first.next_cursor;
    let mut calls = 0;
    while let Some(c) = cur {
        calls += 1;
        assert!(calls < 20);
        let p = pager.page(Some(&c), 4).await.unwrap();
        all.extend(ids(&p.items));
        cur = p.next_cursor;
    }
    let mut dedup = all.clone();
    dedup.sort_unstable();
    dedup.dedup();
    assert_eq!(dedup.len(), all.len(), "an item came back twice: {all:?}");
    assert!(!all.contains(&9), "{all:?}");
    assert_eq!(all.last(), Some(&20));
}

/// agents.md: "false only when no attempt of the call reached the server"; paginate.md:
/// `.build()` "reports every mistake as an error of kind `Config` before any page is fetched".
/// A pager that was never built sent nothing, yet the agent is told to check whether it took
/// effect.
#[test]
fn s96_a_config_error_from_build_reads_as_not_sent() {
    let log: Log = Default::default();
    let e = Paginate::new(
        api(log, |uri| cursor_answer(uri, 1, 1)),
        "/relative",
        JsonCursor::new("/data", "/next"),
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), &ErrorKind::Config);
    let (s, out) = summary_of(e);
    assert_eq!((s.kind, s.retryable), ("config", false));
    assert!(!s.may_have_been_processed, "{out}");
}

/// agents.md: `retry_after_ms` "when the server ... said when (a server's wait capped at 5 min
/// ...)", `attempts` "when the retry layer reported it". Through a pager over a `RetryLayer`, a
/// page answered 429 `Retry-After: 120` (longer than the layer sleeps) reaches the agent with the
/// wait, and a page answered 503 every time with the attempts.
#[tokio::test(start_paused = true)]
async fn s96_a_page_failing_under_the_retry_layer_keeps_the_wait_and_the_attempts() {
    for (status, ra) in [(429u16, Some("120")), (503, None)] {
        let log: Log = Default::default();
        let svc = api(log.clone(), move |uri| {
            if query_map(uri).contains_key("cursor") {
                let mut b = Response::builder().status(status);
                if let Some(ra) = ra {
                    b = b.header("retry-after", ra);
                }
                b.body(Full::from("no")).unwrap()
            } else {
                cursor_answer(uri, 30, 10)
            }
        });
        let client = ServiceBuilder::new()
            .layer(sturdy::retry::RetryLayer::new())
            .service(svc);
        let pager = Paginate::new(
            client,
            "http://api.example.com/items",
            JsonCursor::new("/data", "/next"),
        )
        .unwrap();
        let err = pager.page(None, 15).await.unwrap_err();
        let (s, out) = summary_of(err);
        if status == 429 {
            assert_eq!(s.kind, "rate_limited", "{out}");
            assert_eq!(s.retry_after_ms, Some(120_000), "{out}");
            assert!(s.message.contains("retry after 2m"), "{out}");
            let text = out["content"][0]["text"].as_str().unwrap();
            assert!(text.contains("Try again in 2m"), "{out}");
        } else {
            assert_eq!((s.kind, s.status), ("server_error", Some(503)), "{out}");
            // The final 503 comes back as the response itself (README), so the pager names the
            // status; the attempts are what the server saw.
            let page2 = log
                .lock()
                .unwrap()
                .iter()
                .filter(|u| u.contains("cursor"))
                .count();
            assert_eq!(page2, 4, "{out}");
        }
    }
}

/// RFC 8288: an `anchor` changes a link's context, never the base its target resolves against.
/// A relative next link with `anchor="http://evil.example/x/"` never makes a request to
/// evil.example.
#[tokio::test]
async fn s96_an_anchor_never_moves_a_next_link_to_another_origin() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| {
        let mut r = json_resp(json!([uri.path().len()]));
        if uri.path() == "/a/items" {
            r.headers_mut().insert(
                "link",
                HeaderValue::from_static("<p2>; rel=\"next\"; anchor=\"http://evil.example/x/\""),
            );
        }
        r
    });
    let pager = Paginate::new(svc, "http://api.example.com/a/items", LinkHeader::new("")).unwrap();
    let _ = walk(&pager).await;
    let _ = pager.page(None, 5).await;
    let log = log.lock().unwrap().clone();
    assert!(
        log.iter().all(|u| u.starts_with("http://api.example.com/")),
        "{log:?}"
    );
}

/// version.md: notices are "reported once per endpoint" and "a new deprecation is never missed".
/// A call dropped while its response is on its way (timed out above a `Buffer` and a
/// `ConcurrencyLimit(1)`) reports nothing and uses up nothing: the next call of the endpoint that
/// gets a `Deprecation` reports it, once, and the slot is free.
#[tokio::test(start_paused = true)]
async fn s96_a_dropped_call_does_not_use_up_the_endpoints_notice() {
    let (seen, f) = recorder();
    let calls = Arc::new(Mutex::new(0u32));
    let c = calls.clone();
    let api = service_fn(move |_req: Request<()>| {
        let c = c.clone();
        async move {
            let n = {
                let mut g = c.lock().unwrap();
                *g += 1;
                *g
            };
            if n == 1 {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            Ok::<_, Infallible>(
                Response::builder()
                    .header("deprecation", "@1688169599")
                    .header("sunset", "Sun, 30 Jun 2030 23:59:59 GMT")
                    .body(())
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .buffer(4)
        .concurrency_limit(1)
        .layer(
            VersionLayer::header("api-version", "1")
                .unwrap()
                .on_notice(f),
        )
        .service(api);
    let mut kept = svc.clone();
    let req = || {
        Request::get("http://api.example.com/v1/x")
            .body(())
            .unwrap()
    };
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        kept.ready().await.unwrap().call(req()),
    )
    .await;
    assert!(r.is_err());
    assert!(seen.lock().unwrap().is_empty());
    for _ in 0..3 {
        tokio::time::timeout(
            Duration::from_secs(1),
            kept.ready().await.unwrap().call(req()),
        )
        .await
        .expect("the slot was kept")
        .unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].deprecation, Some(Some(at(1_688_169_599))));
    assert_eq!(seen[0].sunset, Some(at(1_909_094_399)));
}

/// paginate.md: a cursor "from another endpoint ... is refused before any request is sent"; the
/// tag covers "the pager's URI". Two pagers with one key over the same path with different
/// filters (`?status=open`, `?status=closed`) are two walks: a cursor of one is refused by the
/// other, before any request.
#[tokio::test]
async fn s96_a_cursor_of_another_filter_is_refused_before_any_request() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| cursor_answer(uri, 30, 10));
    let mk = |q: &str| {
        Paginate::builder(
            svc.clone(),
            &format!("http://api.example.com/items?status={q}"),
            JsonCursor::new("/data", "/next"),
        )
        .with_cursor_key(KEY)
        .build()
        .unwrap()
    };
    let open = mk("open");
    let closed = mk("closed");
    for lim in [3usize, 10] {
        let c = open.page(None, lim).await.unwrap().next_cursor.unwrap();
        let n = log.lock().unwrap().len();
        let err = closed.page(Some(&c), 5).await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Pagination);
        assert_eq!(log.lock().unwrap().len(), n);
        // And the cursor still works where it came from.
        assert!(open.page(Some(&c), 5).await.is_ok());
    }
}

/// version.md: "a version the caller set is kept": a pager's own `with_header` of the pinned
/// header is the caller's, on every page of the walk; pages without it get the pin.
#[tokio::test]
async fn s96_a_pagers_own_version_header_is_kept_on_every_page() {
    let seen: Arc<Mutex<Vec<Vec<String>>>> = Default::default();
    let s = seen.clone();
    let inner = service_fn(move |req: Request<Full<Bytes>>| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(
                req.headers()
                    .get_all("api-version")
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect(),
            );
            Ok::<_, Infallible>(cursor_answer(req.uri(), 25, 10))
        }
    });
    let client = ServiceBuilder::new()
        .layer(VersionLayer::header("api-version", "2024-06-01").unwrap())
        .service(inner);
    let own = Paginate::builder(
        client.clone(),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_header(
        http::HeaderName::from_static("api-version"),
        HeaderValue::from_static("2023-01-01"),
    )
    .build()
    .unwrap();
    let (items, err) = walk(&own).await;
    assert!(err.is_none());
    assert_eq!(items.len(), 25);
    let plain = Paginate::new(
        client,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let (items, _) = walk(&plain).await;
    assert_eq!(items.len(), 25);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6);
    assert!(seen[..3].iter().all(|v| v == &["2023-01-01"]), "{seen:?}");
    assert!(seen[3..].iter().all(|v| v == &["2024-06-01"]), "{seen:?}");
}

/// `Sunset` is an HTTP date (RFC 8594 -> RFC 9110 `HTTP-date`), "read leniently": the obsolete
/// RFC 850 form has a two-digit year, which RFC 9110 5.6.7 says to read as the year within 50
/// years from now ("more than 50 years in the future" is the most recent past year with those
/// digits). In 2026, `-72` is 2072 and `-99` is 1999; asctime with a one-digit day is that day.
#[tokio::test]
async fn s96_sunset_two_digit_years_follow_the_fifty_year_rule() {
    let n = notice_for(None, Some("Wednesday, 30-Jun-99 23:59:59 GMT")).await;
    assert_eq!(n[0].sunset, Some(at(930_787_199)));
    let n = notice_for(None, Some("Sun Jun  2 23:59:59 2030")).await;
    assert_eq!(n[0].sunset, Some(at(1_906_675_199)));
    let n = notice_for(None, Some("Thursday, 30-Jun-72 23:59:59 GMT")).await;
    assert_eq!(n[0].sunset, Some(at(3_234_556_799)), "{n:?}");
}

/// The `page()` docs: `has_more` "whether more items may follow", `next_cursor` "`None` at the
/// end". A limit that takes exactly the last item of the last page: no more, no cursor, and no
/// page fetched past the end.
#[tokio::test]
async fn s96_a_limit_ending_on_the_last_item_says_no_more() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| cursor_answer(uri, 20, 10));
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(10)
    .build()
    .unwrap();
    let a = pager.page(None, 13).await.unwrap();
    let b = pager.page(a.next_cursor.as_deref(), 7).await.unwrap();
    assert_eq!(nums(&b.items), (13..20).collect::<Vec<_>>());
    assert!(!b.has_more);
    assert_eq!(b.next_cursor, None);
    assert_eq!(log.lock().unwrap().len(), 3, "{:?}", log.lock().unwrap());
}

/// paginate.md: build reports "a JSON pointer without its leading `/`" as `Config`; strategy
/// docs: a pointer is RFC 6901 ("`~` is followed by `0` or `1`"). Escaped keys are read as RFC
/// 6901 says (`~1` is `/`, `~0` is `~`), and a bad escape is a `Config` error before any page.
#[tokio::test]
async fn s96_json_pointers_with_escapes_are_rfc_6901() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| {
        let q = query_map(uri);
        if q.contains_key("cursor") {
            json_resp(json!({"a/b": [3], "n~x": null}))
        } else {
            json_resp(json!({"a/b": [1, 2], "n~x": "c1"}))
        }
    });
    let pager = Paginate::new(
        svc.clone(),
        "http://api.example.com/items",
        JsonCursor::new("/a~1b", "/n~0x"),
    )
    .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(nums(&items), [1, 2, 3]);
    log.lock().unwrap().clear();
    for (items_ptr, next_ptr) in [("/a~2b", "/n"), ("/a", "/n~"), ("a", "/n"), ("/a", "n")] {
        let e = Paginate::new(
            svc.clone(),
            "http://api.example.com/items",
            JsonCursor::new(items_ptr, next_ptr),
        )
        .err()
        .unwrap_or_else(|| panic!("{items_ptr} {next_ptr} accepted"));
        assert_eq!(e.kind(), &ErrorKind::Config, "{items_ptr} {next_ptr}: {e}");
    }
    assert!(log.lock().unwrap().is_empty());
}

/// version.md: "a URI too long to hold the query parameter, past the 65,534 bytes `http::Uri`
/// allows, is sent without it" (the `query` docs: "its path and query would pass the 65,534
/// bytes"). At the boundary: a path and query of exactly 65,534 bytes with the pin is pinned; one
/// byte more is sent as it is, unchanged, with no panic; a short one gets the pin.
#[tokio::test]
async fn s96_a_query_pin_at_the_length_limit() {
    let seen: Arc<Mutex<Vec<String>>> = Default::default();
    let s = seen.clone();
    let api = service_fn(move |req: Request<()>| {
        let s = s.clone();
        async move {
            s.lock()
                .unwrap()
                .push(req.uri().path_and_query().unwrap().to_string());
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    let svc = VersionLayer::query("api-version", "2024-06-01").layer(api);
    let pin = "?api-version=2024-06-01";
    let uri_of = |path_len: usize| {
        let pq = format!("/{}", "a".repeat(path_len - 1));
        Uri::builder()
            .scheme("http")
            .authority("api.example.com")
            .path_and_query(pq)
            .build()
            .unwrap()
    };
    let fits = 65_534 - pin.len();
    for (len, pinned) in [(fits, true), (fits + 1, false)] {
        seen.lock().unwrap().clear();
        svc.clone()
            .oneshot(Request::get(uri_of(len)).body(()).unwrap())
            .await
            .unwrap();
        let got = seen.lock().unwrap()[0].clone();
        let want = if pinned { len + pin.len() } else { len };
        assert_eq!(got.len(), want, "path of {len}");
        assert_eq!(got.ends_with(pin), pinned, "path of {len}");
    }
    seen.lock().unwrap().clear();
    svc.oneshot(
        Request::get("http://api.example.com/x?y=1")
            .body(())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(seen.lock().unwrap()[0], "/x?y=1&api-version=2024-06-01");
}

/// json-server 0.17 answers `_page=0` as page 1 and builds its links by replacing `page=1` in
/// the request URL, which `_page=0` does not contain: its next link is the very URL just
/// fetched. paginate.md: the page "is yielded and the walk ends with a loop error instead of
/// fetching that URI again: no item is yielded twice"; a `page()` call is refused likewise.
#[tokio::test]
async fn s96_json_server_page_zero_links_to_itself_and_ends_as_a_loop() {
    let Some(js) = json_server(12).await else {
        return;
    };
    let pager = Paginate::new(
        hyper_client(),
        &format!("{}/items?_page=0&_limit=5", js.base),
        LinkHeader::new(""),
    )
    .unwrap();
    let (items, err) = walk(&pager).await;
    assert_eq!(ids(&items), [1, 2, 3, 4, 5]);
    let err = err.expect("a loop error");
    assert_eq!(err.kind(), &ErrorKind::Pagination);
    assert!(err.to_string().contains("loop"), "{err}");
    let r = pager.page(None, 5).await.unwrap();
    assert_eq!(ids(&r.items), [1, 2, 3, 4, 5]);
    let e = pager.page(r.next_cursor.as_deref(), 5).await;
    assert!(e.is_err(), "{:?}", e.map(|p| ids(&p.items)));
    assert_eq!(e.unwrap_err().kind(), &ErrorKind::Pagination);
}

/// The `pages()` docs: "Ends after the last page; a guard or a failed page ends it with an
/// error." Once ended (by an error, a bound or the last page) the stream stays ended: polled
/// again it yields nothing and sends no request.
#[tokio::test]
async fn s96_an_ended_stream_stays_ended_and_sends_nothing() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| {
        if query_map(uri).get("cursor").map(String::as_str) == Some("10") {
            Response::builder()
                .status(500)
                .body(Full::from("x"))
                .unwrap()
        } else {
            cursor_answer(uri, 25, 10)
        }
    });
    let failing = Paginate::new(
        svc.clone(),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let bounded = Paginate::builder(
        svc.clone(),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_items(3)
    .build()
    .unwrap();
    let whole = Paginate::new(
        api(log.clone(), |uri| cursor_answer(uri, 5, 10)),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    for (name, mut s, errs) in [
        ("failing", failing.items(), true),
        ("bounded", bounded.items(), true),
        ("whole", whole.items(), false),
    ] {
        let mut saw_err = false;
        while let Some(r) = s.next().await {
            if r.is_err() {
                saw_err = true;
                break;
            }
        }
        assert_eq!(saw_err, errs, "{name}");
        let n = log.lock().unwrap().len();
        for _ in 0..3 {
            assert!(s.next().await.is_none(), "{name}: more after the end");
        }
        assert_eq!(
            log.lock().unwrap().len(),
            n,
            "{name}: requests after the end"
        );
    }
}

/// RFC 3986: an empty reference `<>` is the page itself. paginate.md: a next cursor leading "to
/// a URI already fetched in this walk" yields the page and ends with a loop error; in `page()`,
/// a cursor that "would fetch the page it came from" is an error.
#[tokio::test]
async fn s96_an_empty_next_link_is_the_page_itself_and_a_loop() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |_| {
        let mut r = json_resp(json!([1, 2]));
        r.headers_mut()
            .insert("link", HeaderValue::from_static("<>; rel=\"next\""));
        r
    });
    let pager =
        Paginate::new(svc, "http://api.example.com/items?x=1", LinkHeader::new("")).unwrap();
    let (items, err) = walk(&pager).await;
    assert_eq!(nums(&items), [1, 2]);
    assert_eq!(err.expect("a loop error").kind(), &ErrorKind::Pagination);
    assert_eq!(log.lock().unwrap().len(), 1);
    let p = pager.page(None, 2).await;
    // Either the call sees the loop, or it returns the items and its cursor is refused.
    if let Ok(p) = p {
        assert_eq!(nums(&p.items), [1, 2]);
        if let Some(c) = p.next_cursor {
            let e = pager.page(Some(&c), 2).await.unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Pagination);
        }
    }
    assert!(log.lock().unwrap().len() <= 2, "{:?}", log.lock().unwrap());
}

/// agents.md: "may have been processed" is false when no attempt reached the server ("a refused
/// connection"); RELIABILITY.md: a page failing in a bare hyper-util client reads "page N (...)
/// failed: connection refused". json-server stopped between two bounded pages: the next call
/// fails (from a fresh pager with the same key, whose client has no pooled connection) as a
/// refused connection the agent may retry, and not sent.
#[tokio::test]
async fn s96_json_server_gone_between_pages_reads_as_refused_and_not_sent() {
    let Some(mut js) = json_server(9).await else {
        return;
    };
    let pager = Paginate::builder(
        hyper_client(),
        &format!("{}/items?_page=1", js.base),
        LinkHeader::new("").with_limit_param("_limit"),
    )
    .with_page_size(4)
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let first = pager.page(None, 6).await.unwrap();
    assert_eq!(ids(&first.items), [1, 2, 3, 4, 5, 6]);
    let _ = js.child.kill();
    let _ = js.child.wait();
    // A fresh client (a restarted agent process): no pooled connection to the dead server.
    let again = Paginate::builder(
        hyper_client(),
        &format!("{}/items?_page=1", js.base),
        LinkHeader::new("").with_limit_param("_limit"),
    )
    .with_page_size(4)
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let err = again
        .page(first.next_cursor.as_deref(), 6)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Connect, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("page 1") && msg.contains("connection refused"),
        "{msg}"
    );
    let (s, out) = summary_of(err);
    assert_eq!(s.kind, "connect");
    assert!(s.retryable, "{out}");
    assert!(!s.may_have_been_processed, "{out}");
}
