//! Pagination against its guide and rustdoc: hostile Link headers, pages that never end,
//! tampered cursors, streams dropped mid-page, and walks through the sturdy client stack under
//! tower's `Buffer` and `ConcurrencyLimit`.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Query;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sturdy::core::{Error, ErrorKind};
use sturdy::paginate::{JsonCursor, LinkHeader, OffsetLimit, PageNumber, Paginate, MAX_CURSOR_LEN};
use tower::service_fn;

type Seen = Arc<Mutex<Vec<String>>>;

/// An in-process API: `f(uri)` gives (status, Link header, body); every URI is recorded.
fn api(
    f: impl Fn(&str) -> (u16, Option<String>, String) + Send + Sync + 'static,
) -> (
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Seen,
) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let f = Arc::new(f);
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        let uri = req.uri().to_string();
        s.lock().unwrap().push(uri.clone());
        let (status, link, body) = f(&uri);
        async move {
            let mut b = Response::builder().status(status);
            if let Some(l) = link {
                b = b.header("link", l);
            }
            Ok::<_, Infallible>(b.body(Full::from(body)).unwrap())
        }
    });
    (svc, seen)
}

fn kind(e: &Error) -> &ErrorKind {
    e.kind()
}

fn page_param(uri: &str) -> usize {
    uri.split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("page="))
        .map_or(1, |v| v.parse().unwrap())
}

// ---- Link header hostility -------------------------------------------------------------------

#[tokio::test]
async fn link_back_to_page_one_yields_each_item_once_then_a_loop_error() {
    let (svc, seen) = api(|uri| {
        let p = page_param(uri);
        let next = if p == 1 { "/items?page=2" } else { "/items" };
        (
            200,
            Some(format!("<{next}>; rel=\"next\"")),
            json!([p * 10, p * 10 + 1]).to_string(),
        )
    });
    let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    let mut items = Vec::new();
    let mut err = None;
    let mut s = pager.items();
    while let Some(r) = s.next().await {
        match r {
            Ok(v) => items.push(v),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert_eq!(
        items,
        vec![json!(10), json!(11), json!(20), json!(21)],
        "{:?}",
        seen.lock().unwrap()
    );
    let err = err.expect("a loop error");
    assert_eq!(kind(&err), &ErrorKind::Pagination);
    assert!(err.to_string().contains("loop"), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_page_linking_to_itself_is_yielded_once() {
    let (svc, seen) = api(|_| (200, Some("</items>; rel=\"next\"".into()), "[1]".into()));
    let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    let pages: Vec<_> = pager.pages().collect().await;
    assert_eq!(pages.len(), 2, "{:?}", seen.lock().unwrap());
    assert!(pages[0].is_ok());
    assert_eq!(kind(pages[1].as_ref().unwrap_err()), &ErrorKind::Pagination);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn foreign_next_link_is_refused_unless_allowed() {
    let make = || {
        api(|uri| {
            if uri.starts_with("http://evil.test") {
                (200, None, "[99]".into())
            } else {
                (
                    200,
                    Some("<http://evil.test/steal?token=abc>; rel=\"next\"".into()),
                    "[1]".into(),
                )
            }
        })
    };
    let (svc, seen) = make();
    let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    let r: Result<Vec<Value>, Error> = pager.items().try_collect().await;
    let err = r.unwrap_err();
    assert_eq!(kind(&err), &ErrorKind::Pagination);
    assert!(!err.to_string().contains("token=abc"), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 1);

    let (svc, seen) = make();
    let pager = Paginate::builder(svc, "http://api.test/items", LinkHeader::new(""))
        .with_foreign_origin_allowed(true)
        .build()
        .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all, vec![json!(1), json!(99)]);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn other_port_or_scheme_is_another_origin() {
    for next in [
        "http://api.test:8080/items?page=2",
        "https://api.test/items?page=2",
    ] {
        let n = next.to_string();
        let (svc, seen) = api(move |_| (200, Some(format!("<{n}>; rel=\"next\"")), "[1]".into()));
        let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
        let r: Result<Vec<Value>, Error> = pager.items().try_collect().await;
        assert_eq!(kind(&r.unwrap_err()), &ErrorKind::Pagination, "{next}");
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn megabyte_link_header_with_next_last_is_followed_quickly() {
    let (svc, seen) = api(|uri| {
        if page_param(uri) == 2 {
            return (200, None, "[2]".into());
        }
        let filler: String = (0..20_000)
            .map(|i| format!("<http://api.test/x{i}>; rel=\"item\", "))
            .collect();
        let link = format!("{filler}</items?page=2>; rel=\"next\"");
        assert!(link.len() > 700_000);
        (200, Some(link), "[1]".into())
    });
    let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    let started = tokio::time::Instant::now();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all, vec![json!(1), json!(2)]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn thousands_of_rels_on_one_link_still_find_next() {
    let (svc, _seen) = api(|uri| {
        if page_param(uri) == 2 {
            return (200, None, "[2]".into());
        }
        let rels: Vec<String> = (0..5000).map(|i| format!("r{i}")).collect();
        let link = format!("</items?page=2>; rel=\"{} next\"", rels.join(" "));
        (200, Some(link), "[1]".into())
    });
    let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all, vec![json!(1), json!(2)]);
}

#[tokio::test]
async fn thousands_of_params_on_the_next_link_do_not_hang() {
    let (svc, _seen) = api(|uri| {
        if page_param(uri) == 2 {
            return (200, None, "[2]".into());
        }
        let params: String = (0..5000).map(|i| format!("; p{i}=\"v\"")).collect();
        (
            200,
            Some(format!("</items?page=2>{params}; rel=\"next\"")),
            "[1]".into(),
        )
    });
    let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    let started = tokio::time::Instant::now();
    let r: Result<Vec<Value>, Error> = pager.items().try_collect().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    // Past 32 parameters a link may be dropped; either way the walk ends cleanly.
    if let Ok(all) = r {
        assert!(
            all == vec![json!(1)] || all == vec![json!(1), json!(2)],
            "{all:?}"
        );
    }
}

#[tokio::test]
async fn link_header_first_page_asks_per_page_when_a_size_is_set() {
    let (svc, seen) = api(|_| (200, None, "[1]".into()));
    let pager = Paginate::builder(svc, "http://api.test/items", LinkHeader::new(""))
        .with_page_size(7)
        .build()
        .unwrap();
    pager.items().try_collect::<Vec<_>>().await.unwrap();
    assert_eq!(seen.lock().unwrap()[0], "http://api.test/items?per_page=7");
}

/// `LinkHeader::new`: "when a page size is set ..., the first page is asked for
/// `?per_page=<size>`; without one, the first URL is sent as given."
#[tokio::test]
async fn link_header_first_page_asks_per_page_only_with_a_page_size() {
    let (svc, seen) = api(|_| (200, None, "[1]".into()));
    let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    pager.items().try_collect::<Vec<_>>().await.unwrap();
    let first = seen.lock().unwrap()[0].clone();
    assert!(!first.contains("per_page="), "sent {first}");
}

#[tokio::test]
async fn relative_links_resolve_against_the_page_uri() {
    let (svc, seen) = api(|uri| match page_param(uri) {
        1 => (
            200,
            Some("<page2?page=2>; rel=\"next\"".into()),
            "[1]".into(),
        ),
        2 => (200, Some("<../top?page=3>; rel=next".into()), "[2]".into()),
        _ => (200, None, "[3]".into()),
    });
    let pager = Paginate::new(
        svc,
        "http://api.test/v1/items",
        LinkHeader::new("").without_limit_param(),
    )
    .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 3);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[1], "http://api.test/v1/page2?page=2");
    assert_eq!(seen[2], "http://api.test/top?page=3");
}

// ---- pages that never end ----------------------------------------------------------------------

#[tokio::test]
async fn empty_pages_forever_end_at_max_pages() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let (svc, seen) = api(move |_| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        (
            200,
            None,
            json!({"data": [], "next": format!("c{i}")}).to_string(),
        )
    });
    let pager = Paginate::builder(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_pages(50)
    .build()
    .unwrap();
    let r: Result<Vec<Value>, Error> = pager.items().try_collect().await;
    let err = r.unwrap_err();
    assert_eq!(kind(&err), &ErrorKind::Pagination);
    assert_eq!(seen.lock().unwrap().len(), 50);

    let started = tokio::time::Instant::now();
    let err = pager.page(None, 10).await.unwrap_err();
    assert_eq!(kind(&err), &ErrorKind::Pagination);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(seen.lock().unwrap().len() <= 100);
}

#[tokio::test]
async fn default_max_pages_is_one_thousand() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let (svc, seen) = api(move |_| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        (
            200,
            None,
            json!({"data": [i], "next": format!("c{i}")}).to_string(),
        )
    });
    let pager = Paginate::new(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let mut ok = 0;
    let mut s = pager.items();
    let mut last = None;
    while let Some(r) = s.next().await {
        match r {
            Ok(_) => ok += 1,
            Err(e) => {
                last = Some(e);
                break;
            }
        }
    }
    assert_eq!(ok, 1000);
    assert_eq!(kind(&last.unwrap()), &ErrorKind::Pagination);
    assert_eq!(seen.lock().unwrap().len(), 1000);
}

#[tokio::test]
async fn max_items_yields_the_items_before_the_bound() {
    let (svc, _seen) = api(|uri| {
        let c: usize = uri
            .split(['?', '&'])
            .find_map(|kv| kv.strip_prefix("cursor="))
            .map_or(0, |v| v.parse().unwrap());
        (
            200,
            None,
            json!({"data": [c, c + 1, c + 2], "next": (c + 3).to_string()}).to_string(),
        )
    });
    let pager = Paginate::builder(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_items(7)
    .build()
    .unwrap();
    let mut got = Vec::new();
    let mut s = pager.items();
    let mut err = None;
    while let Some(r) = s.next().await {
        match r {
            Ok(v) => got.push(v),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert_eq!(got.len(), 7);
    assert_eq!(kind(&err.unwrap()), &ErrorKind::Pagination);
}

#[tokio::test(start_paused = true)]
async fn a_page_that_never_answers_times_out_at_sixty_seconds() {
    let svc = service_fn(|_req: Request<Full<Bytes>>| async {
        std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
    });
    let pager = Paginate::new(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let start = tokio::time::Instant::now();
    let err = pager.page(None, 5).await.unwrap_err();
    assert_eq!(kind(&err), &ErrorKind::Timeout);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(60) && took < Duration::from_secs(61),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn page_timeout_covers_a_stalled_body() {
    let svc = service_fn(|_req: Request<Full<Bytes>>| async {
        let stream = futures_util::stream::once(async {
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"{\"data\":[")))
        })
        .chain(futures_util::stream::pending());
        Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(stream)))
    });
    let pager = Paginate::builder(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_timeout(Duration::from_secs(5))
    .build()
    .unwrap();
    let start = tokio::time::Instant::now();
    let r: Result<Vec<Value>, Error> = pager.items().try_collect().await;
    assert_eq!(kind(&r.unwrap_err()), &ErrorKind::Timeout);
    assert!(start.elapsed() < Duration::from_secs(6));
}

#[tokio::test]
async fn page_over_the_byte_limit_is_a_body_error() {
    let (svc, _seen) = api(|_| {
        (
            200,
            None,
            json!({"data": vec![1; 1000], "next": null}).to_string(),
        )
    });
    let pager = Paginate::builder(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_page_bytes(100)
    .build()
    .unwrap();
    let r: Result<Vec<Value>, Error> = pager.items().try_collect().await;
    assert_eq!(kind(&r.unwrap_err()), &ErrorKind::Body);
}

#[tokio::test]
async fn bad_json_and_error_status_name_the_page() {
    let (svc, _seen) = api(|uri| match page_param(uri) {
        1 => (200, Some("</items?page=2>; rel=next".into()), "[1]".into()),
        _ => (200, None, "{not json".into()),
    });
    let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    let err = pager.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert_eq!(kind(&err), &ErrorKind::Pagination);
    assert!(err.to_string().contains("page 2"), "{err}");

    let (svc, _seen) = api(|_| (503, None, "down".into()));
    let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    let err = pager.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert_eq!(
        kind(&err),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{err}"
    );
}

// ---- cursors ------------------------------------------------------------------------------------

fn counting_api() -> (
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Seen,
) {
    api(|uri| {
        let c: usize = uri
            .split(['?', '&'])
            .find_map(|kv| kv.strip_prefix("cursor="))
            .map_or(0, |v| v.parse().unwrap());
        let end = (c + 5).min(23);
        let next = if end < 23 {
            json!(end.to_string())
        } else {
            Value::Null
        };
        (
            200,
            None,
            json!({"data": (c..end).collect::<Vec<_>>(), "next": next}).to_string(),
        )
    })
}

#[tokio::test]
async fn page_resumes_inside_a_server_page_and_ends_exactly() {
    let (svc, _seen) = counting_api();
    let pager = Paginate::builder(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(5)
    .build()
    .unwrap();
    let mut cursor: Option<String> = None;
    let mut all = Vec::new();
    loop {
        let p = pager.page(cursor.as_deref(), 3).await.unwrap();
        assert!(p.items.len() <= 3);
        all.extend(p.items);
        if !p.has_more {
            assert!(p.next_cursor.is_none());
            break;
        }
        cursor = p.next_cursor;
    }
    assert_eq!(all, (0..23).map(|i| json!(i)).collect::<Vec<_>>());
}

#[tokio::test]
async fn limit_zero_reads_as_one() {
    let (svc, _seen) = counting_api();
    let pager = Paginate::new(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    assert_eq!(pager.page(None, 0).await.unwrap().items.len(), 1);
}

#[tokio::test]
async fn tampered_truncated_long_or_foreign_cursors_send_nothing() {
    let (svc, seen) = counting_api();
    let pager = Paginate::new(
        svc.clone(),
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let p = pager.page(None, 2).await.unwrap();
    let cursor = p.next_cursor.unwrap();
    let before = seen.lock().unwrap().len();

    let mut flipped = cursor.clone().into_bytes();
    let mid = flipped.len() / 2;
    flipped[mid] = if flipped[mid] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let truncated = cursor[..cursor.len() - 1].to_string();
    let long = "A".repeat(MAX_CURSOR_LEN + 1);
    let other = Paginate::new(
        svc.clone(),
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let foreign = other.page(None, 2).await.unwrap().next_cursor.unwrap();
    let before = before + 1;
    for (what, c) in [
        ("flipped", flipped.as_str()),
        ("truncated", truncated.as_str()),
        ("16 KiB + 1", long.as_str()),
        ("other pager", foreign.as_str()),
        ("empty", ""),
        ("non-ASCII", "é✓"),
    ] {
        let err = pager.page(Some(c), 2).await.unwrap_err();
        assert_eq!(kind(&err), &ErrorKind::Pagination, "{what}");
        assert!(err.to_string().len() < 400, "{what}: {err}");
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "no request for a bad cursor"
    );
    assert!(pager.page(Some(&cursor), 2).await.is_ok());
}

#[tokio::test]
async fn shared_cursor_key_moves_cursors_between_pagers_but_not_endpoints() {
    let key = [7u8; 32];
    let (svc, _seen) = counting_api();
    let a = Paginate::builder(
        svc.clone(),
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(key)
    .build()
    .unwrap();
    let b = Paginate::builder(
        svc.clone(),
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(key)
    .build()
    .unwrap();
    let c = Paginate::builder(
        svc,
        "http://api.test/other",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(key)
    .build()
    .unwrap();
    let cur = a.page(None, 2).await.unwrap().next_cursor.unwrap();
    assert_eq!(b.page(Some(&cur), 2).await.unwrap().items[0], json!(2));
    assert_eq!(
        kind(&c.page(Some(&cur), 2).await.unwrap_err()),
        &ErrorKind::Pagination
    );
}

#[test]
fn config_mistakes_are_config_errors() {
    let (svc, _seen) = counting_api();
    let jc = || JsonCursor::new("/data", "/next");
    let errs = [
        Paginate::builder(svc.clone(), "http://api.test/items", jc())
            .with_max_pages(0)
            .build()
            .err(),
        Paginate::builder(svc.clone(), "http://api.test/items", jc())
            .with_max_items(0)
            .build()
            .err(),
        Paginate::builder(svc.clone(), "http://api.test/items", jc())
            .with_page_timeout(Duration::ZERO)
            .build()
            .err(),
        Paginate::builder(svc.clone(), "http://api.test/items", jc())
            .with_cursor_key([1u8; 31])
            .build()
            .err(),
        Paginate::builder(svc.clone(), "http://api.test/items", jc())
            .with_max_page_bytes(0)
            .build()
            .err(),
        Paginate::builder(svc.clone(), "http://api.test/items", jc())
            .with_page_size(0)
            .build()
            .err(),
        Paginate::new(svc.clone(), "/items", jc()).err(),
        Paginate::new(
            svc.clone(),
            "http://api.test/items",
            JsonCursor::new("data", "/next"),
        )
        .err(),
        Paginate::new(
            svc.clone(),
            "http://api.test/items",
            JsonCursor::new("/data", "/next").with_cursor_param(""),
        )
        .err(),
        Paginate::new(
            svc.clone(),
            "http://api.test/items",
            PageNumber::new("/d").with_page_size(0),
        )
        .err(),
    ];
    for (i, e) in errs.iter().enumerate() {
        let e = e.as_ref().unwrap_or_else(|| panic!("case {i} built"));
        assert_eq!(e.kind(), &ErrorKind::Config, "case {i}: {e}");
    }
    assert!(Paginate::builder(svc, "http://api.test/items", jc())
        .with_cursor_key([1u8; 32])
        .build()
        .is_ok());
}

#[test]
fn debug_of_a_pager_never_shows_the_cursor_key() {
    let (svc, _seen) = counting_api();
    let pager = Paginate::builder(
        svc,
        "http://user:pw@api.test/items?api_key=SEKRIT",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(*b"KEYKEYKEYKEYKEYKEYKEYKEYKEYKEY99")
    .build();
    if let Ok(p) = pager {
        let d = format!("{p:?}");
        assert!(!d.contains("KEYKEYKEY"), "{d}");
        assert!(!d.contains("SEKRIT"), "{d}");
        assert!(!d.contains(":pw@"), "{d}");
    }
}

#[tokio::test]
async fn page_number_and_offset_stop_on_short_pages_and_totals() {
    let (svc, seen) = api(|uri| {
        let p = page_param(uri);
        let items: Vec<usize> = if p < 3 { vec![p; 20] } else { vec![p; 3] };
        (200, None, json!({"d": items}).to_string())
    });
    let pager = Paginate::new(svc, "http://api.test/items", PageNumber::new("/d")).unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 43);
    assert_eq!(seen.lock().unwrap().len(), 3);

    let (svc, seen) = api(|uri| {
        let off: usize = uri
            .split(['?', '&'])
            .find_map(|kv| kv.strip_prefix("offset="))
            .map_or(0, |v| v.parse().unwrap());
        // The server caps pages at 10 whatever was asked.
        let end = (off + 10).min(25);
        (
            200,
            None,
            json!({"d": (off..end).collect::<Vec<_>>(), "total": 25}).to_string(),
        )
    });
    let pager = Paginate::new(
        svc,
        "http://api.test/items",
        OffsetLimit::new("/d").with_total("/total"),
    )
    .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all, (0..25).map(|i| json!(i)).collect::<Vec<_>>());
    assert_eq!(seen.lock().unwrap().len(), 3);
}

// ---- composition over the wire ---------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct Q {
    page: Option<usize>,
    stall: Option<u8>,
}

async fn serve_items(stall_page: Option<usize>) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = Router::new().route(
        "/items",
        get(move |Query(q): Query<Q>| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                let p = q.page.unwrap_or(1);
                let items: Vec<usize> = (p * 10..p * 10 + 10).collect();
                let mut headers = http::HeaderMap::new();
                if p < 5 {
                    headers.insert(
                        "link",
                        format!("</items?page={}>; rel=\"next\"", p + 1)
                            .parse()
                            .unwrap(),
                    );
                }
                if Some(p) == stall_page && q.stall.is_none() {
                    let s = futures_util::stream::once(async {
                        Ok::<_, Infallible>(Bytes::from_static(b"["))
                    })
                    .chain(futures_util::stream::pending());
                    return (headers, axum::body::Body::from_stream(s)).into_response();
                }
                (headers, axum::Json(items)).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits)
}

#[tokio::test]
async fn walks_through_the_sturdy_client_under_buffer_and_concurrency_limit_one() {
    let (addr, hits) = serve_items(None).await;
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = sturdy::ClientBuilder::new().build(http);
    let svc = tower::ServiceBuilder::new()
        .buffer(8)
        .concurrency_limit(1)
        .service(client);
    let pager = Paginate::new(
        svc,
        &format!("http://{addr}/items?page=1"),
        LinkHeader::new("").without_limit_param(),
    )
    .unwrap();
    let (a, b) = tokio::join!(
        pager.items().try_collect::<Vec<Value>>(),
        pager.items_as::<usize>().try_collect::<Vec<usize>>()
    );
    assert_eq!(a.unwrap().len(), 50);
    assert_eq!(b.unwrap(), (10..60).collect::<Vec<_>>());
    assert_eq!(hits.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn stream_dropped_mid_page_then_a_new_walk_gets_everything() {
    let (addr, hits) = serve_items(Some(2)).await;
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = sturdy::ClientBuilder::new().build(http);
    let svc = tower::ServiceBuilder::new()
        .concurrency_limit(1)
        .service(client);
    let pager = Paginate::builder(
        svc,
        &format!("http://{addr}/items?page=1"),
        LinkHeader::new("").without_limit_param(),
    )
    .with_page_timeout(Duration::from_secs(5))
    .build()
    .unwrap();
    let mut s = pager.items();
    for _ in 0..10 {
        s.next().await.unwrap().unwrap();
    }
    // Page 2 stalls mid-body: drop the stream while it waits.
    let r = tokio::time::timeout(Duration::from_millis(100), s.next()).await;
    assert!(r.is_err(), "page 2 should be stalled");
    drop(s);
    // The concurrency permit of the dropped page must be back: a new call of the same pager runs.
    let walk = tokio::time::timeout(Duration::from_secs(3), pager.page(None, 5)).await;
    let first = walk
        .expect("a new call is not blocked by the dropped one")
        .unwrap();
    assert_eq!(first.items, (10..15).map(|i| json!(i)).collect::<Vec<_>>());
    assert!(hits.load(Ordering::SeqCst) >= 3);
}

#[tokio::test]
async fn foreign_link_error_does_not_leak_credentials() {
    let (svc, _seen) = api(|_| {
        (
            200,
            Some("<http://user:hunter2@evil.test/x?api_key=SEKRIT>; rel=\"next\"".into()),
            "[1]".into(),
        )
    });
    let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    let err = pager.items().try_collect::<Vec<_>>().await.unwrap_err();
    let words = format!("{err} {err:?}");
    assert!(
        !words.contains("hunter2") && !words.contains("SEKRIT"),
        "{words}"
    );
    assert!(
        words.contains("evil.test") || words.contains("origin"),
        "names its cause: {words}"
    );
}

#[tokio::test]
async fn bounded_page_serialises_as_documented() {
    let (svc, _seen) = counting_api();
    let pager = Paginate::new(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let p = pager.page(None, 2).await.unwrap();
    let j = serde_json::to_value(&p).unwrap();
    assert!(
        j.get("items").is_some() && j.get("has_more").is_some() && j.get("next_cursor").is_some(),
        "{j}"
    );
}

// ---- more cursors and JSON -----------------------------------------------------------------------------

#[tokio::test]
async fn a_server_cursor_that_never_changes_is_a_loop_not_a_repeat() {
    let (svc, seen) = api(|_| {
        (
            200,
            None,
            json!({"data": [1, 2], "next": "same"}).to_string(),
        )
    });
    let pager = Paginate::new(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let mut items = Vec::new();
    let mut s = pager.items();
    let mut err = None;
    while let Some(r) = s.next().await {
        match r {
            Ok(v) => items.push(v),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert_eq!(
        items,
        vec![json!(1), json!(2), json!(1), json!(2)],
        "first page, then the `same` page once"
    );
    assert_eq!(kind(&err.unwrap()), &ErrorKind::Pagination);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn page_refuses_a_cursor_whose_page_is_the_one_it_came_from() {
    let (svc, seen) = api(|_| {
        (
            200,
            None,
            json!({"data": [1, 2, 3], "next": "same"}).to_string(),
        )
    });
    let pager = Paginate::builder(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(3)
    .build()
    .unwrap();
    let p1 = pager.page(None, 3).await.unwrap();
    let p2 = pager.page(p1.next_cursor.as_deref(), 3).await.unwrap();
    assert_eq!(p2.items, vec![json!(1), json!(2), json!(3)]);
    let before = seen.lock().unwrap().len();
    let r = pager.page(p2.next_cursor.as_deref(), 3).await;
    assert_eq!(kind(&r.unwrap_err()), &ErrorKind::Pagination);
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "refused before a request"
    );
}

#[tokio::test]
async fn odd_next_cursor_values_end_cleanly() {
    for next in [
        json!(""),
        json!(12),
        json!(false),
        json!({"x": 1}),
        json!([1]),
    ] {
        let n = next.clone();
        let (svc, seen) = api(move |uri| {
            if uri.contains("cursor=") {
                (200, None, json!({"data": [9], "next": null}).to_string())
            } else {
                (200, None, json!({"data": [1], "next": n}).to_string())
            }
        });
        let pager = Paginate::new(
            svc,
            "http://api.test/items",
            JsonCursor::new("/data", "/next"),
        )
        .unwrap();
        let r: Result<Vec<Value>, Error> = pager.items().try_collect().await;
        if let Err(e) = &r {
            assert!(e.to_string().len() < 300, "{e}");
        }
        assert!(seen.lock().unwrap().len() <= 2, "{next}");
    }
}

#[tokio::test]
async fn page_at_the_exact_end_says_no_more() {
    let (svc, _seen) = api(|uri| {
        let c: usize = uri
            .split(['?', '&'])
            .find_map(|kv| kv.strip_prefix("cursor="))
            .map_or(0, |v| v.parse().unwrap());
        let next = if c + 5 < 10 {
            json!((c + 5).to_string())
        } else {
            Value::Null
        };
        (
            200,
            None,
            json!({"data": (c..c + 5).collect::<Vec<_>>(), "next": next}).to_string(),
        )
    });
    let pager = Paginate::builder(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(5)
    .build()
    .unwrap();
    let a = pager.page(None, 5).await.unwrap();
    assert!(a.has_more);
    let b = pager.page(a.next_cursor.as_deref(), 5).await.unwrap();
    assert_eq!(b.items.len(), 5);
    assert!(
        !b.has_more && b.next_cursor.is_none(),
        "{:?}",
        b.next_cursor
    );
}

#[tokio::test]
async fn limit_above_max_items_reads_as_the_bound() {
    let (svc, _seen) = counting_api();
    let pager = Paginate::builder(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_items(7)
    .build()
    .unwrap();
    let p = pager.page(None, 1000).await.unwrap();
    assert_eq!(p.items.len(), 7);
    assert!(p.has_more);
}

#[tokio::test]
async fn page_asks_min_limit_100_by_default() {
    let (svc, seen) = counting_api();
    let pager = Paginate::new(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    pager.page(None, 3).await.unwrap();
    pager.page(None, 500).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(seen[0].contains("limit=3"), "{seen:?}");
    assert!(seen.iter().any(|u| u.contains("limit=100")), "{seen:?}");
}

#[tokio::test]
async fn items_as_a_wrong_type_is_an_error_not_a_panic() {
    let (svc, _seen) = counting_api();
    let pager = Paginate::new(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let r: Result<Vec<String>, Error> = pager.items_as::<String>().try_collect().await;
    let e = r.unwrap_err();
    assert!(!e.to_string().is_empty());
}

#[tokio::test]
async fn with_header_goes_with_every_page_and_clones_share_the_cursor_key() {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        s.lock().unwrap().push(
            req.headers()
                .get("x-tenant")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default(),
        );
        let c: usize = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("cursor="))
            .map_or(0, |v| v.parse().unwrap());
        let next = if c < 10 {
            json!((c + 2).to_string())
        } else {
            Value::Null
        };
        async move {
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(
                json!({"data": [c, c + 1], "next": next}).to_string(),
            )))
        }
    });
    let pager = Paginate::builder(
        svc,
        "http://api.test/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_header(
        http::HeaderName::from_static("x-tenant"),
        http::HeaderValue::from_static("t-9"),
    )
    .build()
    .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 12);
    assert!(seen.lock().unwrap().iter().all(|t| t == "t-9"));
    let clone = pager.clone();
    let cur = pager.page(None, 2).await.unwrap().next_cursor.unwrap();
    assert!(clone.page(Some(&cur), 2).await.is_ok());
}

#[tokio::test]
async fn page_debug_hides_userinfo_and_query_of_the_next_link() {
    let (svc, _seen) = api(|uri| {
        if uri.contains("page=2") {
            (200, None, "[2]".into())
        } else {
            (
                200,
                Some(
                    "<http://user:hunter2@api.test/items?page=2&api_key=SEKRIT>; rel=\"next\""
                        .into(),
                ),
                "[1]".into(),
            )
        }
    });
    let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    let mut pages = pager.pages();
    let first = pages.next().await.unwrap().unwrap();
    let d = format!("{first:?}");
    assert!(!d.contains("hunter2") && !d.contains("SEKRIT"), "{d}");
}

#[tokio::test]
async fn a_page_of_one_mib_of_links_in_the_header_over_the_wire() {
    // hyper's default limits cap a response head; the walk must end with an error, not hang.
    let app = Router::new().route(
        "/items",
        get(|| async {
            let link: String = (0..30_000)
                .map(|i| format!("</x{i}>; rel=\"item\", "))
                .collect();
            let mut h = http::HeaderMap::new();
            h.insert(
                "link",
                format!("{link}</items?page=2>; rel=\"next\"")
                    .parse()
                    .unwrap(),
            );
            (h, axum::Json(vec![1]))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let pager = Paginate::builder(http, &format!("http://{addr}/items"), LinkHeader::new(""))
        .with_page_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        pager.items().try_collect::<Vec<Value>>(),
    )
    .await;
    let r = r.expect("no hang");
    if let Err(e) = r {
        assert!(e.to_string().len() < 500, "{e}");
    }
}
