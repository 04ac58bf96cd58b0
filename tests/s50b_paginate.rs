//! Round s50b, `sturdy-paginate` from the outside (docs/guides/paginate.md, docs/guides/agents.md
//! and the crate docs): RFC 8288 `Link` headers from a hostile peer (thousands of links, quoted
//! commas and semicolons, several relation types, a repeated `rel`, relative, network-path and
//! other-origin targets, loops), enormous server cursors, `page()` cursors resumed after a call
//! dropped mid-page, inside server pages, with changing limits, the bounds and the exact body
//! limit, and no secret of a next link in an error or `Debug`.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{Request, Response};
use http_body_util::Full;
use serde_json::{json, Value};
use sturdy::core::{Error, ErrorKind};
use sturdy::paginate::{JsonCursor, LinkHeader, OffsetLimit, PageNumber, Paginate};

type Answer = (u16, Vec<(String, String)>, String);

/// An in-process API: `f(uri)` answers each request; every URI asked is logged.
#[derive(Clone)]
struct Api {
    log: Arc<Mutex<Vec<String>>>,
    f: Arc<dyn Fn(&str) -> Answer + Send + Sync>,
}

impl Api {
    fn new(f: impl Fn(&str) -> Answer + Send + Sync + 'static) -> Self {
        Self {
            log: Arc::default(),
            f: Arc::new(f),
        }
    }

    fn asked(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future: Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let api = self.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let uri = req.uri().to_string();
            api.log.lock().unwrap().push(uri.clone());
            let (status, headers, body) = (api.f)(&uri);
            let mut res = Response::builder().status(status);
            for (k, v) in headers {
                res = res.header(k, v);
            }
            let res = res.body(Full::from(body)).unwrap();
            async move { Ok::<_, Infallible>(res) }
        })
    }
}

fn link(v: &str) -> Vec<(String, String)> {
    vec![("link".to_owned(), v.to_owned())]
}

fn query(uri: &str, key: &str) -> Option<String> {
    let q = uri.split_once('?')?.1;
    q.split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
}

fn ints(items: &[Value]) -> Vec<u64> {
    items.iter().map(|v| v.as_u64().unwrap()).collect()
}

/// A Link-header API of three pages, `/v1/items` then `?p=2`, `?p=3`; `next(p)` writes the
/// header of page `p`.
fn link_api(next: impl Fn(u64) -> Option<String> + Send + Sync + 'static) -> Api {
    Api::new(move |uri| {
        let p: u64 = query(uri, "p").map_or(1, |p| p.parse().unwrap());
        let items: Vec<u64> = ((p - 1) * 3..p * 3).collect();
        let headers = next(p).map(|h| link(&h)).unwrap_or_default();
        (200, headers, json!(items).to_string())
    })
}

async fn walk(api: &Api, first: &str) -> (Vec<u64>, Option<Error>) {
    let pager = Paginate::new(api.service(), first, LinkHeader::new("")).unwrap();
    let mut items = Vec::new();
    let mut stream = pager.items();
    loop {
        match stream.try_next().await {
            Ok(Some(v)) => items.push(v.as_u64().unwrap()),
            Ok(None) => return (items, None),
            Err(e) => return (items, Some(e)),
        }
    }
}

/// A next link among 5,000 others, in one header and in many lines: found, quickly.
#[tokio::test]
async fn thousands_of_links_are_parsed_in_bounded_time() {
    let api = link_api(|p| {
        (p < 3).then(|| {
            let mut h = String::new();
            for i in 0..5_000 {
                h.push_str(&format!(
                    "<https://api.example.com/other/{i}>; rel=\"item\", "
                ));
            }
            h.push_str(&format!(
                "<https://api.example.com/v1/items?p={}>; rel=\"next\"",
                p + 1
            ));
            h
        })
    });
    let started = tokio::time::Instant::now();
    let (items, err) = walk(&api, "https://api.example.com/v1/items").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(items, (0..9).collect::<Vec<_>>());
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Quoted commas and semicolons, a `<...>; rel=next` inside a quoted title: only the real next
/// link is followed.
#[tokio::test]
async fn quoted_commas_and_semicolons_do_not_make_links() {
    let api = link_api(|p| {
        (p < 3).then(|| {
            format!(
                "<https://api.example.com/v1/items?p=99>; rel=\"prev\"; title=\"a, <https://api.example.com/v1/items?p=77>; rel=next\", \
                 <https://api.example.com/v1/items?p={}>; title=\"x;y, z\"; rel=\"next\"",
                p + 1
            )
        })
    });
    let (items, err) = walk(&api, "https://api.example.com/v1/items").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(items, (0..9).collect::<Vec<_>>());
    assert!(api
        .asked()
        .iter()
        .all(|u| !u.contains("p=77") && !u.contains("p=99")));
}

/// STANDARDS.md §7.4 (meziantou): `rel=abc` and `rel\t="d\"e;f,"` are not `next`: one page.
#[tokio::test]
async fn the_meziantou_vector_has_no_next_link() {
    let api = link_api(|_| {
        Some("<sample>; rel=abc, <plop>; rel\t=\"d\\\"e;f,\"; title = test title; abc".into())
    });
    let (items, err) = walk(&api, "https://api.example.com/v1/items").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(items, [0, 1, 2]);
    assert_eq!(api.asked().len(), 1);
}

/// `rel` with several types, unquoted, in upper case, and links spread over two field lines.
#[tokio::test]
async fn next_among_several_relation_types_unquoted_or_upper_case() {
    for form in [
        "<{u}>; rel=\"prev next\"",
        "<{u}>; rel=next",
        "<{u}>; REL=\"NEXT\"",
        "<{u}> ; rel = \"next\"",
        "<https://api.example.com/v1/items?p=1>; rel=\"first\", <{u}>; rel=\"next\"",
    ] {
        let form = form.to_owned();
        let api = link_api(move |p| {
            (p < 3).then(|| {
                form.replace(
                    "{u}",
                    &format!("https://api.example.com/v1/items?p={}", p + 1),
                )
            })
        });
        let (items, err) = walk(&api, "https://api.example.com/v1/items").await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(items, (0..9).collect::<Vec<_>>());
    }
}

/// RFC 8288 §3.3: "occurrences after the first MUST be ignored by parsers": a link whose first
/// `rel` is `prev` is not a next link.
#[tokio::test]
async fn a_second_rel_param_is_ignored() {
    let api = link_api(|p| (p < 3).then(|| format!("<?p={}>; rel=\"prev\"; rel=\"next\"", p + 1)));
    let (items, err) = walk(&api, "https://api.example.com/v1/items").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(items, [0, 1, 2], "asked: {:?}", api.asked());
}

/// Relative targets are resolved against the page's URI (RFC 3986 §5).
#[tokio::test]
async fn relative_next_links_are_resolved_against_the_page() {
    for (target, expected) in [
        ("?p=2", "https://api.example.com/v1/items?p=2"),
        ("items?p=2", "https://api.example.com/v1/items?p=2"),
        ("/v1/items?p=2", "https://api.example.com/v1/items?p=2"),
        ("../v1/items?p=2", "https://api.example.com/v1/items?p=2"),
        ("./items?p=2", "https://api.example.com/v1/items?p=2"),
        (
            "HTTPS://API.example.com:443/v1/items?p=2",
            "api.example.com",
        ),
    ] {
        let t = target.to_owned();
        let api = link_api(move |p| (p == 1).then(|| format!("<{t}>; rel=\"next\"")));
        let (items, err) = walk(&api, "https://api.example.com/v1/items").await;
        assert!(err.is_none(), "{target}: {err:?}");
        assert_eq!(items, (0..6).collect::<Vec<_>>(), "{target}");
        let asked = api.asked();
        assert!(
            asked[1].to_lowercase().contains(expected),
            "{target}: {asked:?}"
        );
        assert!(asked[1].ends_with("/v1/items?p=2"), "{target}: {asked:?}");
    }
}

/// A network-path reference (`//other/...`), another scheme or port, and an absolute foreign
/// URL are other origins: refused with kind `Pagination`, and the error shows neither the
/// link's userinfo nor its query.
#[tokio::test]
async fn foreign_next_links_are_refused_without_showing_their_secrets() {
    for target in [
        "//evil.example/steal?token=QS-SECRET-1234",
        "http://api.example.com/v1/items?token=QS-SECRET-1234",
        "https://api.example.com:8443/v1/items?token=QS-SECRET-1234",
        "https://user:PW-SECRET-5678@evil.example/x?token=QS-SECRET-1234",
    ] {
        let t = target.to_owned();
        let api = link_api(move |p| (p == 1).then(|| format!("<{t}>; rel=\"next\"")));
        let (items, err) = walk(&api, "https://api.example.com/v1/items").await;
        assert_eq!(items, [0, 1, 2], "{target}");
        let err = err.unwrap_or_else(|| panic!("{target}: followed"));
        assert_eq!(err.kind(), &ErrorKind::Pagination, "{target}: {err}");
        assert_eq!(api.asked().len(), 1);
        let text = format!("{err} {err:?}");
        assert!(!text.contains("QS-SECRET-1234"), "{text}");
        assert!(!text.contains("PW-SECRET-5678"), "{text}");
    }
}

/// A loop back to the first page (written differently) and to page 2: every page once, no item
/// twice, then a `Pagination` error.
#[tokio::test]
async fn loops_back_to_earlier_pages_end_the_walk_without_duplicates() {
    for back in [
        "HTTPS://api.EXAMPLE.com:443/v1/items",
        "https://api.example.com/v1/items?p=2",
    ] {
        let b = back.to_owned();
        let api = link_api(move |p| {
            Some(if p < 3 {
                format!("<?p={}>; rel=\"next\"", p + 1)
            } else {
                format!("<{b}>; rel=\"next\"")
            })
        });
        let (items, err) = walk(&api, "https://api.example.com/v1/items").await;
        assert_eq!(items, (0..9).collect::<Vec<_>>(), "{back}");
        let err = err.unwrap_or_else(|| panic!("{back}: no loop error"));
        assert_eq!(err.kind(), &ErrorKind::Pagination);
        assert_eq!(api.asked().len(), 3, "{back}: {:?}", api.asked());
    }
}

/// A JSON-cursor API over 0..total, honouring `limit` up to `cap`, with numeric string cursors.
fn cursor_api(total: u64, cap: u64) -> Api {
    Api::new(move |uri| {
        let start: u64 = query(uri, "cursor").map_or(0, |c| c.parse().unwrap());
        let limit: u64 = query(uri, "limit").map_or(20, |l| l.parse().unwrap());
        let end = (start + limit.min(cap)).min(total);
        let next = if end < total {
            json!(end.to_string())
        } else {
            Value::Null
        };
        (
            200,
            vec![],
            json!({"data": (start..end).collect::<Vec<_>>(), "next": next}).to_string(),
        )
    })
}

async fn collect_pages(
    pager: &Paginate<impl sturdy::paginate::PageStrategy>,
    limits: &[usize],
) -> Vec<u64> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    for i in 0.. {
        let limit = limits[i % limits.len()];
        let page = pager.page(cursor.as_deref(), limit).await.unwrap();
        assert!(page.items.len() <= limit.max(1));
        all.extend(ints(&page.items));
        assert_eq!(page.has_more, page.next_cursor.is_some());
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(i < 1000);
    }
    all
}

/// A server that ignores the size asked (20 a page, whatever `limit`), walked with limits 7,
/// 13, 3, 1: every item once, in order.
#[tokio::test]
async fn bounded_pages_resume_inside_server_pages_with_changing_limits() {
    let api = cursor_api(45, 20);
    let api2 = Api::new({
        let a = api.clone();
        move |uri| {
            // Ignore the limit asked for.
            let u = uri.replace("limit=", "ignored=");
            (a.f)(&u)
        }
    });
    let pager = Paginate::new(
        api2.service(),
        "https://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    assert_eq!(
        collect_pages(&pager, &[7, 13, 3, 1]).await,
        (0..45).collect::<Vec<_>>()
    );
    assert_eq!(
        collect_pages(&pager, &[0]).await,
        (0..45).collect::<Vec<_>>()
    );
}

/// PageNumber with a server that caps pages at 5 and reports a total; OffsetLimit likewise.
#[tokio::test]
async fn numbered_strategies_resume_exactly_with_a_capped_server() {
    let numbered = Api::new(|uri| {
        let page: u64 = query(uri, "page").unwrap().parse().unwrap();
        let per: u64 = query(uri, "per_page").unwrap().parse().unwrap();
        let per = per.min(5);
        let start = (page - 1) * per;
        let end = (start + per).min(23);
        let items: Vec<u64> = (start.min(23)..end).collect();
        (
            200,
            vec![],
            json!({"items": items, "total": 23}).to_string(),
        )
    });
    let pager = Paginate::new(
        numbered.service(),
        "https://api.example.com/n",
        PageNumber::new("/items").with_total("/total"),
    )
    .unwrap();
    let expected: Vec<u64> = (0..23).collect();
    let got = collect_pages(&pager, &[7, 3, 11]).await;
    assert_eq!(got, expected);
    let offsets = Api::new(|uri| {
        let off: u64 = query(uri, "offset").unwrap().parse().unwrap();
        let lim: u64 = query(uri, "limit").unwrap().parse().unwrap();
        let end = (off + lim.min(5)).min(23);
        let items: Vec<u64> = (off.min(23)..end).collect();
        (
            200,
            vec![],
            json!({"items": items, "total": 23}).to_string(),
        )
    });
    let pager = Paginate::new(
        offsets.service(),
        "https://api.example.com/o",
        OffsetLimit::new("/items").with_total("/total"),
    )
    .unwrap();
    assert_eq!(collect_pages(&pager, &[7, 2, 11]).await, expected);
}

/// A `page()` call dropped while its second server page is in flight, then asked again with the
/// same cursor: the same items, nothing lost or duplicated.
#[tokio::test(start_paused = true)]
async fn a_page_call_dropped_mid_page_resumes_from_its_cursor() {
    let stall = Arc::new(AtomicUsize::new(1));
    let inner = cursor_api(50, 10);
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = {
        let inner = inner.service();
        let stall = stall.clone();
        let calls = calls.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let stall_now = n == 2 && stall.swap(0, Ordering::SeqCst) == 1;
            let fut = tower::ServiceExt::oneshot(inner.clone(), req);
            async move {
                if stall_now {
                    std::future::pending::<()>().await;
                }
                fut.await
            }
        })
    };
    let pager = Paginate::builder(
        svc,
        "https://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(10)
    .build()
    .unwrap();
    let first = pager.page(None, 15).await.unwrap();
    assert_eq!(ints(&first.items), (0..15).collect::<Vec<_>>());
    let c = first.next_cursor.clone().unwrap();
    // Needs pages 2 and 3 (items 15..30); page 3 stalls, the caller gives up.
    let dropped = tokio::time::timeout(Duration::from_secs(5), pager.page(Some(&c), 15)).await;
    assert!(dropped.is_err());
    let again = pager.page(Some(&c), 15).await.unwrap();
    assert_eq!(ints(&again.items), (15..30).collect::<Vec<_>>());
    let rest = pager.page(again.next_cursor.as_deref(), 100).await.unwrap();
    assert_eq!(ints(&rest.items), (30..50).collect::<Vec<_>>());
    assert!(!rest.has_more);
    assert!(rest.next_cursor.is_none());
}

/// "Fetches only the pages needed": 40 items from 20-item pages is two requests, and with
/// `max_pages(2)` it succeeds while 41 items fail.
#[tokio::test]
async fn a_page_call_fetches_only_what_it_needs_within_max_pages() {
    let api = cursor_api(100, 20);
    let pager = Paginate::builder(
        api.service(),
        "https://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(20)
    .with_max_pages(2)
    .build()
    .unwrap();
    let p = pager.page(None, 40).await.unwrap();
    assert_eq!(p.items.len(), 40);
    assert!(p.has_more);
    assert_eq!(api.asked().len(), 2, "{:?}", api.asked());
    let err = pager.page(None, 41).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
}

/// A server cursor longer than `MAX_CURSOR_LEN`: the walk follows it; `page()` fails with an
/// error that does not carry the 20 KiB cursor; an agent's cursor that long is refused unsent.
#[tokio::test]
async fn an_enormous_server_cursor() {
    let huge = "c".repeat(20 * 1024);
    let h = huge.clone();
    let api = Api::new(move |uri| {
        if query(uri, "cursor").is_some() {
            (
                200,
                vec![],
                json!({"data": [2, 3], "next": null}).to_string(),
            )
        } else {
            (200, vec![], json!({"data": [0, 1], "next": h}).to_string())
        }
    });
    let pager = Paginate::new(
        api.service(),
        "https://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(ints(&all), [0, 1, 2, 3]);
    match pager.page(None, 2).await {
        Ok(p) => {
            assert!(p
                .next_cursor
                .as_ref()
                .is_none_or(|c| c.len() <= sturdy::paginate::MAX_CURSOR_LEN));
            panic!(
                "a page whose resume cursor is too long was returned: {} items, cursor {:?}",
                p.items.len(),
                p.next_cursor.map(|c| c.len())
            );
        }
        Err(e) => {
            assert_eq!(e.kind(), &ErrorKind::Pagination, "{e}");
            assert!(
                e.to_string().len() < 4096,
                "{} bytes of error",
                e.to_string().len()
            );
        }
    }
    let before = api.asked().len();
    let long = "A".repeat(sturdy::paginate::MAX_CURSOR_LEN + 1);
    let err = pager.page(Some(&long), 2).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Pagination);
    assert!(err.to_string().len() < 4096);
    assert_eq!(api.asked().len(), before);
}

/// Edited, truncated, foreign (same key, other URI) cursors are refused before any request.
#[tokio::test]
async fn cursors_it_did_not_return_are_refused_unsent() {
    let key = [7u8; 32];
    let api = cursor_api(100, 20);
    let pager = Paginate::builder(
        api.service(),
        "https://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(key)
    .build()
    .unwrap();
    let other = Paginate::builder(
        api.service(),
        "https://api.example.com/other",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(key)
    .build()
    .unwrap();
    let c = pager.page(None, 5).await.unwrap().next_cursor.unwrap();
    let asked = api.asked().len();
    let mut edited = c.clone().into_bytes();
    let mid = edited.len() / 2;
    edited[mid] = if edited[mid] == b'A' { b'B' } else { b'A' };
    let edited = String::from_utf8(edited).unwrap();
    for bad in [
        edited.as_str(),
        &c[..c.len() - 1],
        &c[1..],
        "",
        "%%%%",
        "\u{1F600}",
    ] {
        let err = pager.page(Some(bad), 5).await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Pagination, "{bad:?}: {err}");
    }
    assert!(other.page(Some(&c), 5).await.is_err());
    assert_eq!(api.asked().len(), asked);
    // The genuine one still works, and the same key's other pager accepts only its own.
    assert_eq!(
        ints(&pager.page(Some(&c), 5).await.unwrap().items),
        [5, 6, 7, 8, 9]
    );
}

/// `with_max_page_bytes(n)`: a body of exactly n bytes is read, n + 1 fails with kind `Body`.
#[tokio::test]
async fn the_page_byte_limit_is_exact() {
    let body = json!({"data": [1, 2, 3], "next": null}).to_string();
    let n = body.len();
    let b = body.clone();
    let api = Api::new(move |_| (200, vec![], b.clone()));
    let ok = Paginate::builder(
        api.service(),
        "https://api.example.com/i",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_page_bytes(n)
    .build()
    .unwrap();
    assert_eq!(ok.page(None, 10).await.unwrap().items.len(), 3);
    let short = Paginate::builder(
        api.service(),
        "https://api.example.com/i",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_page_bytes(n - 1)
    .build()
    .unwrap();
    let err = short.page(None, 10).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Body, "{err}");
}

/// Page 2 answers 503, 404, then bad JSON: the kinds the guide gives, the page named.
#[tokio::test]
async fn failed_pages_have_the_kind_of_their_status_or_name_the_page() {
    for (status, body, kind) in [
        (
            503,
            "{}",
            ErrorKind::Server(http::StatusCode::SERVICE_UNAVAILABLE),
        ),
        (404, "{}", ErrorKind::Client(http::StatusCode::NOT_FOUND)),
        (200, "<html>", ErrorKind::Pagination),
    ] {
        let api = Api::new(move |uri| {
            if query(uri, "cursor").is_some() {
                (status, vec![], body.to_owned())
            } else {
                (200, vec![], json!({"data": [0], "next": "1"}).to_string())
            }
        });
        let pager = Paginate::new(
            api.service(),
            "https://api.example.com/items",
            JsonCursor::new("/data", "/next"),
        )
        .unwrap();
        let pages: Vec<_> = {
            let mut s = pager.pages();
            let mut v = Vec::new();
            loop {
                match s.try_next().await {
                    Ok(Some(p)) => v.push(Ok(p)),
                    Ok(None) => break,
                    Err(e) => {
                        v.push(Err(e));
                        break;
                    }
                }
            }
            v
        };
        assert_eq!(pages.len(), 2);
        let err = pages[1].as_ref().unwrap_err();
        assert_eq!(err.kind(), &kind, "{err}");
        if status == 200 {
            assert!(err.to_string().contains('2'), "{err}");
        }
    }
}

/// A page whose head arrives and whose body never ends fails with kind `Timeout` at the page
/// timeout (paused time), through `page()` and through the walk.
#[tokio::test(start_paused = true)]
async fn a_stalled_body_times_out() {
    let svc = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        let stream = futures_util::stream::iter([Ok::<_, Infallible>(http_body::Frame::data(
            Bytes::from_static(b"{\"data\": [1,"),
        ))])
        .chain(futures_util::stream::pending());
        Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(stream)))
    });
    let pager = Paginate::builder(
        svc,
        "https://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_timeout(Duration::from_secs(3))
    .build()
    .unwrap();
    let started = tokio::time::Instant::now();
    let err = pager.page(None, 10).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Timeout, "{err}");
    assert!(started.elapsed() <= Duration::from_secs(4));
    let err = pager.pages().try_next().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Timeout, "{err}");
}

/// `Page`'s `Debug` shows a next link without its userinfo or query.
#[tokio::test]
async fn page_debug_hides_next_link_secrets() {
    let api = link_api(|p| {
        (p == 1).then(|| "<https://u:PW-DBG-9999@api.example.com/v1/items?p=2&sig=SIG-DBG-8888>; rel=\"next\"".into())
    });
    let pager = Paginate::new(
        api.service(),
        "https://api.example.com/v1/items",
        LinkHeader::new(""),
    )
    .unwrap();
    let mut pages = pager.pages();
    let first = pages.try_next().await.unwrap().unwrap();
    let dbg = format!("{first:?}");
    assert!(
        !dbg.contains("PW-DBG-9999") && !dbg.contains("SIG-DBG-8888"),
        "{dbg}"
    );
}

/// "A forged, edited or truncated cursor ... is refused": every one-character edit of a
/// genuine cursor, the last one included (base64 padding bits), is refused.
#[tokio::test]
async fn every_one_character_edit_of_a_cursor_is_refused() {
    let api = cursor_api(100, 20);
    let pager = Paginate::new(
        api.service(),
        "https://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let c = pager.page(None, 5).await.unwrap().next_cursor.unwrap();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut accepted = Vec::new();
    for i in 0..c.len() {
        for &ch in [alphabet[(alphabet
            .iter()
            .position(|&a| a == c.as_bytes()[i])
            .unwrap_or(0)
            + 1)
            % 64]]
        .iter()
        {
            let mut e = c.clone().into_bytes();
            e[i] = ch;
            let e = String::from_utf8(e).unwrap();
            if pager.page(Some(&e), 5).await.is_ok() {
                accepted.push((i, e));
            }
        }
    }
    assert!(
        accepted.is_empty(),
        "edited cursors accepted (cursor {} chars): {:?}",
        c.len(),
        accepted.iter().map(|a| a.0).collect::<Vec<_>>()
    );
}
