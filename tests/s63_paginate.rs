//! s63 outside round: `sturdy-paginate` and `sturdy-version`, with docs/guides/paginate.md,
//! docs/guides/version.md and docs/guides/agents.md read sentence by sentence. In-process mocks
//! for logic (paused time where it waits), real axum servers on 127.0.0.1:0 for the wire. The
//! round's two json-server tests are in `interop_paginate` (run by scripts/interop.sh with the
//! server up).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sturdy::core::summary::{tool_result, ErrorSummary};
use sturdy::core::ErrorKind;
use sturdy::paginate::{
    BoundedPage, JsonCursor, LinkHeader, OffsetLimit, PageNumber, PageStrategy, Paginate,
};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::version::{Notice, VersionLayer};
use sturdy::ClientBuilder;
use tower::{service_fn, Layer, Service, ServiceExt};

const BASE: &str = "http://api.example.com/v1/items";
const KEY: &[u8] = b"s63-shared-cursor-key-0123456789abcdef";

// ---------------------------------------------------------------------------------------------
// helpers

/// What a mock API saw: every request's URI and headers.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, HeaderMap)>>>);

impl Seen {
    fn push(&self, uri: String, headers: HeaderMap) {
        self.0.lock().unwrap().push((uri, headers));
    }
    fn uris(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(u, _)| u.clone())
            .collect()
    }
    fn headers(&self) -> Vec<HeaderMap> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, h)| h.clone())
            .collect()
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

type Answer = (u16, Vec<(&'static str, String)>, String);

/// An in-process API: `answer(uri)` gives (status, headers, body).
fn api<F>(
    answer: F,
) -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Seen,
)
where
    F: Fn(&str) -> Answer + Send + Sync + 'static,
{
    let seen = Seen::default();
    let log = seen.clone();
    let answer = Arc::new(answer);
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        let uri = req.uri().to_string();
        log.push(uri.clone(), req.headers().clone());
        let (status, headers, body) = answer(&uri);
        let mut b = Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(k, v);
        }
        let resp = b.body(Full::from(body)).unwrap();
        async move { Ok::<_, Infallible>(resp) }
    });
    (svc, seen)
}

/// The raw value of query parameter `name` in `uri`.
fn param(uri: &str, name: &str) -> Option<String> {
    let q = uri.split_once('?')?.1;
    let q = q.split('#').next().unwrap_or("");
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_owned())
    })
}

fn num(uri: &str, name: &str) -> Option<usize> {
    param(uri, name).and_then(|v| v.parse().ok())
}

/// A JSON-cursor API over fixed pages: `?cursor=i` is page i, `next` is `i+1` or null.
fn cursor_api(pages: Vec<Vec<u64>>) -> (impl Fn(&str) -> Answer + Send + Sync + 'static, ()) {
    (
        move |uri: &str| {
            let i = num(uri, "cursor").unwrap_or(0);
            let data = pages.get(i).cloned().unwrap_or_default();
            let next = if i + 1 < pages.len() {
                json!((i + 1).to_string())
            } else {
                Value::Null
            };
            (200, vec![], json!({"data": data, "next": next}).to_string())
        },
        (),
    )
}

fn nums(v: &[Value]) -> Vec<u64> {
    v.iter().map(|x| x.as_u64().expect("a number")).collect()
}

/// Every item of a walk, and the error that ended it, within `limit` of time.
async fn walk<P: PageStrategy>(pager: &Paginate<P>) -> (Vec<u64>, Option<sturdy::core::Error>) {
    let mut out = Vec::new();
    let mut s = pager.items();
    let res = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(x) = s.next().await {
            match x {
                Ok(v) => out.push(v.as_u64().expect("a number")),
                Err(e) => return Some(e),
            }
        }
        None
    })
    .await
    .expect("the walk hangs");
    (out, res)
}

/// splitmix64: seeded randomness without a `rand` dependency in this package.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

async fn serve(router: Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    (format!("http://{addr}"), task)
}

fn http_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn fast_retry() -> RetryLayer {
    RetryLayer::new()
        .with_max_attempts(4)
        .with_backoff(
            Backoff::exponential(Duration::from_millis(1), Duration::from_millis(5)).unwrap(),
        )
        .with_seed(63)
}

// ---------------------------------------------------------------------------------------------
// cursors, headers, strategies

/// paginate.md: `JsonCursor` sends the server's cursor back in a query parameter. A server
/// cursor holding `&`, `=`, `+`, `%`, `#`, spaces and non-ASCII must reach the server as it was
/// (decoded by a real HTTP framework), in walks and through `page()` cursors.
#[tokio::test]
async fn json_cursor_reserved_characters_reach_the_server_exactly() {
    const CURSORS: [&str; 7] = [
        "a b",
        "x&cursor=evil",
        "p+q=r",
        "100%",
        "ü/é?#frag",
        "==",
        "%41",
    ];
    type Got = Arc<Mutex<Vec<Option<String>>>>;
    async fn handler(
        State(got): State<Got>,
        Query(q): Query<HashMap<String, String>>,
    ) -> axum::response::Response {
        let c = q.get("cursor").cloned();
        got.lock().unwrap().push(c.clone());
        let i = match &c {
            None => 0,
            Some(c) => match CURSORS.iter().position(|x| x == c) {
                Some(p) => p + 1,
                None => return (http::StatusCode::BAD_REQUEST, "unknown cursor").into_response(),
            },
        };
        let next = CURSORS.get(i).map_or(Value::Null, |c| json!(c));
        axum::Json(json!({"data": [i], "next": next})).into_response()
    }
    let got: Got = Arc::default();
    let (base, server) = serve(
        Router::new()
            .route("/items", get(handler))
            .with_state(got.clone()),
    )
    .await;
    let pager = Paginate::builder(
        http_client(),
        &format!("{base}/items"),
        JsonCursor::new("/data", "/next").without_limit_param(),
    )
    .with_page_timeout(Duration::from_secs(5))
    .build()
    .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(items, (0..=7).collect::<Vec<u64>>());
    let expected: Vec<Option<String>> = std::iter::once(None)
        .chain(CURSORS.iter().map(|c| Some((*c).to_owned())))
        .collect();
    assert_eq!(*got.lock().unwrap(), expected);

    // The same through bounded pages of one item.
    got.lock().unwrap().clear();
    let mut cursor: Option<String> = None;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let p = pager.page(cursor.as_deref(), 1).await.unwrap();
        seen.extend(nums(&p.items));
        cursor = p.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen, (0..=7).collect::<Vec<u64>>());
    assert!(got.lock().unwrap().iter().skip(1).all(Option::is_some));
    server.abort();
}

/// lib.rs: `with_header`: "Sends `name: value` with every page request" — the first page, pages
/// reached through relative and absolute next links, and `page()` calls; once each.
#[tokio::test]
async fn with_header_goes_on_every_page_request_once() {
    let (svc, seen) = api(|uri| match num(uri, "page") {
        Some(2) => (
            200,
            vec![(
                "link",
                "<http://api.example.com/v1/items?page=3>; rel=\"next\"".to_owned(),
            )],
            "[3,4,5]".to_owned(),
        ),
        Some(3) => (200, vec![], "[6]".to_owned()),
        _ => (
            200,
            vec![("link", "<?page=2>; rel=next".to_owned())],
            "[0,1,2]".to_owned(),
        ),
    });
    let pager = Paginate::builder(svc, BASE, LinkHeader::new("").without_limit_param())
        .with_header(
            HeaderName::from_static("x-tenant"),
            HeaderValue::from_static("t1"),
        )
        .build()
        .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(items, (0..7).collect::<Vec<u64>>());
    let mut c: Option<String> = None;
    for _ in 0..10 {
        let p = pager.page(c.as_deref(), 2).await.unwrap();
        c = p.next_cursor;
        if c.is_none() {
            break;
        }
    }
    assert!(seen.len() >= 6, "{:?}", seen.uris());
    for (i, h) in seen.headers().iter().enumerate() {
        let v: Vec<_> = h.get_all("x-tenant").iter().collect();
        assert_eq!(v, ["t1"], "request {i} ({})", seen.uris()[i]);
    }
}

/// strategy.rs: `PageNumber::with_first_page`: "The number of the first page [1]". An API that
/// counts from 0 is walked 0, 1, 2, stopping on the short page.
#[tokio::test]
async fn page_number_can_count_from_zero() {
    let (svc, seen) = api(|uri| {
        let p = num(uri, "page").unwrap();
        let body = match p {
            0 => "{\"data\":[0,1]}",
            1 => "{\"data\":[2,3]}",
            2 => "{\"data\":[4]}",
            _ => "{\"data\":[]}",
        };
        (200, vec![], body.to_owned())
    });
    let pager = Paginate::builder(svc, BASE, PageNumber::new("/data").with_first_page(0))
        .with_page_size(2)
        .build()
        .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(items, vec![0, 1, 2, 3, 4]);
    let pages: Vec<Option<usize>> = seen.uris().iter().map(|u| num(u, "page")).collect();
    assert_eq!(pages, [Some(0), Some(1), Some(2)]);
}

/// Hostile settings must not panic: a first page number of `usize::MAX` against an API whose
/// pages are always full ends the walk (an error, or the bound), never a panic.
#[tokio::test]
async fn page_number_starting_at_usize_max_never_panics() {
    let (svc, seen) = api(|_| (200, vec![], json!({"data": [1, 2]}).to_string()));
    let pager = Paginate::builder(
        svc,
        BASE,
        PageNumber::new("/data").with_first_page(usize::MAX),
    )
    .with_page_size(2)
    .with_max_pages(5)
    .build()
    .unwrap();
    let task = tokio::spawn(async move {
        let mut s = pager.items();
        let mut n = 0;
        while let Some(x) = s.next().await {
            if x.is_err() {
                break;
            }
            n += 1;
        }
        n
    });
    let res = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("hangs");
    assert!(res.is_ok(), "the walk panicked: {res:?}");
    assert!(seen.len() <= 5, "{:?}", seen.uris());
}

/// lib.rs `page()`: "one above `with_max_items` as that bound". With the bound at `usize::MAX`, a
/// limit of `usize::MAX` from a cursor inside a page reads the rest, without an overflow.
#[tokio::test]
async fn the_largest_limit_from_inside_a_page_reads_the_rest() {
    let (f, ()) = cursor_api(vec![vec![0, 1, 2, 3, 4], vec![5, 6, 7, 8, 9], vec![10, 11]]);
    let (svc, _seen) = api(f);
    let pager = Paginate::builder(svc, BASE, JsonCursor::new("/data", "/next"))
        .with_max_items(usize::MAX)
        .with_max_pages(usize::MAX)
        .with_page_size(5)
        .build()
        .unwrap();
    let first = pager.page(None, 2).await.unwrap();
    assert_eq!(nums(&first.items), [0, 1]);
    let cursor = first.next_cursor.clone().unwrap();
    let p2 = pager.clone();
    let res = tokio::spawn(async move { p2.page(Some(&cursor), usize::MAX).await })
        .await
        .expect("page() panicked on limit usize::MAX");
    let rest = res.unwrap();
    assert_eq!(nums(&rest.items), (2..12).collect::<Vec<u64>>());
    assert!(!rest.has_more);
    assert_eq!(rest.next_cursor, None);
    // And from the start, with a limit of `usize::MAX` and the default page size.
    let all = pager.page(None, usize::MAX).await.unwrap();
    assert_eq!(all.items.len(), 12);
}

/// paginate.md: "With a total, `OffsetLimit` stops on the page that reaches it". A total a peer
/// sends may be anything: 0 stops on the first page; other hostile totals never panic, and the
/// walk stays within `max_pages` without repeating an item.
#[tokio::test]
async fn offset_limit_hostile_totals_end_cleanly() {
    let totals = [
        json!(0),
        json!(-1),
        json!("45"),
        json!(4.5),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(null),
        json!(1e300),
        json!(-1e300),
        json!([1]),
        json!({"n": 1}),
    ];
    for total in totals {
        let t = total.clone();
        let (svc, seen) = api(move |uri| {
            let off = num(uri, "offset").unwrap_or(0) as u64;
            let lim = num(uri, "limit").unwrap_or(20) as u64;
            let data: Vec<u64> = (off..off + lim).collect();
            (200, vec![], json!({"data": data, "total": t}).to_string())
        });
        let pager = Paginate::builder(svc, BASE, OffsetLimit::new("/data").with_total("/total"))
            .with_max_pages(4)
            .build()
            .unwrap();
        let task = tokio::spawn(async move { walk(&pager).await });
        let (items, err) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("hangs")
            .unwrap_or_else(|e| panic!("total {total}: the walk panicked: {e}"));
        let mut dedup = items.clone();
        dedup.dedup();
        assert_eq!(dedup, items, "total {total}: an item twice");
        assert!(seen.len() <= 4, "total {total}: {} pages", seen.len());
        if total == json!(0) {
            assert_eq!(seen.len(), 1, "total 0 reached on the first page");
            assert!(err.is_none(), "total 0: {err:?}");
        }
    }
}

/// paginate.md: "More than `max_pages` pages or `max_items` items ends a walk with an error after
/// the items before the bound". Through `pages()`, the items before the bound come in the page
/// that crosses it.
#[tokio::test]
async fn pages_stream_yields_the_items_before_the_item_bound() {
    let (f, ()) = cursor_api(vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8]]);
    let (svc, _seen) = api(f);
    let pager = Paginate::builder(svc, BASE, JsonCursor::new("/data", "/next"))
        .with_max_items(5)
        .build()
        .unwrap();
    let mut s = pager.pages();
    let mut items = Vec::new();
    let mut err = None;
    while let Some(p) = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .unwrap()
    {
        match p {
            Ok(p) => items.extend(nums(&p.items)),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err.expect("a bound error");
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    assert_eq!(
        items,
        [0, 1, 2, 3, 4],
        "the items before the bound, through pages()"
    );
}

/// "More than `max_items` items" ends a walk with an error: exactly `max_items` items, then an
/// empty last page, is not more.
#[tokio::test]
async fn exactly_max_items_then_an_empty_page_is_not_an_error() {
    let (f, ()) = cursor_api(vec![vec![0, 1, 2], vec![3, 4, 5], vec![]]);
    let (svc, _seen) = api(f);
    let pager = Paginate::builder(svc, BASE, JsonCursor::new("/data", "/next"))
        .with_max_items(6)
        .build()
        .unwrap();
    let (items, err) = walk(&pager).await;
    assert_eq!(items, [0, 1, 2, 3, 4, 5]);
    assert!(err.is_none(), "exactly max_items is not more: {err:?}");
    let p = pager.page(None, 6).await.unwrap();
    assert_eq!(p.items.len(), 6);
}

/// paginate.md: "the cursor is opaque and resumes exactly after the last item returned, even
/// inside a server page". A twin pager (same key, same URI) with another page size must resume
/// at the same item, for page numbers and offsets alike.
#[tokio::test]
async fn a_twin_pager_with_another_page_size_resumes_exactly() {
    fn numbered(uri: &str) -> Answer {
        let size = num(uri, "per_page").unwrap_or(20);
        let page = num(uri, "page").unwrap_or(1);
        let start = (page - 1) * size;
        let data: Vec<usize> = (start..(start + size).min(50)).collect();
        (200, vec![], json!({"data": data}).to_string())
    }
    fn offsets(uri: &str) -> Answer {
        let lim = num(uri, "limit").unwrap_or(20);
        let off = num(uri, "offset").unwrap_or(0);
        let data: Vec<usize> = (off.min(50)..(off + lim).min(50)).collect();
        (200, vec![], json!({"data": data}).to_string())
    }
    for kind in ["numbered", "offsets"] {
        let (svc, _seen) = api(if kind == "numbered" {
            numbered
        } else {
            offsets
        });
        let (a, b): (Vec<u64>, Vec<u64>);
        if kind == "numbered" {
            let pa = Paginate::builder(svc.clone(), BASE, PageNumber::new("/data"))
                .with_page_size(10)
                .with_cursor_key(KEY)
                .build()
                .unwrap();
            let pb = Paginate::builder(svc.clone(), BASE, PageNumber::new("/data"))
                .with_page_size(7)
                .with_cursor_key(KEY)
                .build()
                .unwrap();
            (a, b) = twin_walk(&pa, &pb).await;
        } else {
            let pa = Paginate::builder(svc.clone(), BASE, OffsetLimit::new("/data"))
                .with_page_size(10)
                .with_cursor_key(KEY)
                .build()
                .unwrap();
            let pb = Paginate::builder(svc.clone(), BASE, OffsetLimit::new("/data"))
                .with_page_size(7)
                .with_cursor_key(KEY)
                .build()
                .unwrap();
            (a, b) = twin_walk(&pa, &pb).await;
        }
        assert_eq!(a, (0..14).collect::<Vec<u64>>(), "{kind}");
        assert_eq!(
            b,
            (14..50).collect::<Vec<u64>>(),
            "{kind}: the twin resumes exactly"
        );
    }
}

/// Reads 14 items with `a`, then the rest with `b` from `a`'s cursor, 10 at a time.
async fn twin_walk<P: PageStrategy>(a: &Paginate<P>, b: &Paginate<P>) -> (Vec<u64>, Vec<u64>) {
    let first = a.page(None, 14).await.unwrap();
    let mut rest = Vec::new();
    let mut c = first.next_cursor.clone();
    for _ in 0..20 {
        let Some(cur) = c.take() else { break };
        let p = b.page(Some(&cur), 10).await.unwrap();
        rest.extend(nums(&p.items));
        c = p.next_cursor;
    }
    (nums(&first.items), rest)
}

/// paginate.md Guards: "Pages are known by the URI they are fetched from". A next link that
/// differs from the page's own URI only by a fragment fetches the same URI (a fragment is never
/// sent): the page must not be fetched again and its items must not be yielded twice.
#[tokio::test]
async fn a_next_link_to_the_same_page_with_a_fragment_is_a_loop() {
    for link in [
        "<#more>; rel=next",
        "<http://api.example.com/v1/items#top>; rel=\"next\"",
    ] {
        let (svc, seen) =
            api(move |_| (200, vec![("link", link.to_owned())], "[0,1,2]".to_owned()));
        let pager = Paginate::builder(svc, BASE, LinkHeader::new("").without_limit_param())
            .with_max_pages(5)
            .build()
            .unwrap();
        let (items, err) = walk(&pager).await;
        let err = err.expect("an error");
        assert_eq!(
            items,
            [0, 1, 2],
            "{link}: items yielded twice ({err}); {:?}",
            seen.uris()
        );
        assert_eq!(err.kind(), &ErrorKind::Pagination, "{link}: {err}");
        assert_eq!(seen.len(), 1, "{link}: {:?}", seen.uris());
    }
}

/// paginate.md: bounded pages resume exactly, for `LinkHeader` too, whatever the limit of each
/// call (seeded): every item once, in order.
#[tokio::test]
async fn link_header_bounded_pages_resume_exactly_under_seeded_limits() {
    const N: usize = 53;
    let (svc, _seen) = api(|uri| {
        let size = num(uri, "per_page").unwrap_or(10).min(100);
        let page = num(uri, "page").unwrap_or(1);
        let start = (page - 1) * size;
        let end = (start + size).min(N);
        let data: Vec<usize> = (start.min(N)..end).collect();
        let mut h = vec![];
        if end < N {
            h.push((
                "link",
                format!("<?page={}&per_page={size}>; rel=\"next\", <?page=1&per_page={size}>; rel=\"first\"", page + 1),
            ));
        }
        (200, h, json!(data).to_string())
    });
    let pager = Paginate::builder(svc, BASE, LinkHeader::new(""))
        .build()
        .unwrap();
    for seed in [1u64, 7, 63] {
        let mut rng = Rng(seed);
        let mut got = Vec::new();
        let mut c: Option<String> = None;
        for _ in 0..200 {
            let limit = 1 + rng.below(12) as usize;
            let p = pager.page(c.as_deref(), limit).await.unwrap();
            assert!(p.items.len() <= limit);
            got.extend(nums(&p.items));
            c = p.next_cursor;
            if c.is_none() {
                assert!(!p.has_more);
                break;
            }
        }
        assert_eq!(got, (0..N as u64).collect::<Vec<_>>(), "seed {seed}");
    }
}

/// agents.md: a `BoundedPage { items, has_more, next_cursor }` "serialises as is", and
/// `tool_result` of a value gives its JSON as text and `{"result": value}`.
#[tokio::test]
async fn a_bounded_page_serialises_as_is_and_makes_a_tool_result() {
    let (f, ()) = cursor_api(vec![vec![0, 1, 2], vec![3]]);
    let (svc, _seen) = api(f);
    let pager = Paginate::new(svc, BASE, JsonCursor::new("/data", "/next")).unwrap();
    let page = pager.page(None, 2).await.unwrap();
    let v = serde_json::to_value(&page).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    let mut keys: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["has_more", "items", "next_cursor"]);
    assert_eq!(v["items"], json!([0, 1]));
    assert_eq!(v["has_more"], json!(true));
    assert!(v["next_cursor"].is_string());
    let back: BoundedPage = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(back, page);
    // The model hands the cursor back after a JSON round trip.
    let next = pager.page(back.next_cursor.as_deref(), 5).await.unwrap();
    assert_eq!(nums(&next.items), [2, 3]);
    let end = serde_json::to_value(&next).unwrap();
    assert_eq!(end["next_cursor"], Value::Null);
    assert_eq!(end["has_more"], json!(false));

    let out = tool_result::<BoundedPage>(Ok(page));
    assert_eq!(out["isError"], json!(false));
    assert_eq!(out["structuredContent"], json!({ "result": v }));
    let text = out["content"][0]["text"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(text).unwrap(), v);
}

/// agents.md: a made-up cursor "is refused before any request is sent"; its summary says
/// `pagination`, not retryable, and the advice does not tell the model to try again.
#[tokio::test]
async fn a_made_up_cursor_summarises_as_pagination_and_not_retryable() {
    let (f, ()) = cursor_api(vec![vec![0, 1, 2]]);
    let (svc, seen) = api(f);
    let pager = Paginate::new(svc, BASE, JsonCursor::new("/data", "/next")).unwrap();
    for forged in [
        "",
        "x",
        "eyJjIjoiMSJ9",
        &"A".repeat(5000),
        "../../etc/passwd",
        "\u{0}",
    ] {
        let err = pager.page(Some(forged), 5).await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Pagination, "{forged:?}: {err}");
        let s = ErrorSummary::of(&err);
        assert_eq!(s.kind, "pagination");
        assert!(!s.retryable, "{forged:?}");
        assert!(!s.advice().starts_with("Try again"), "{}", s.advice());
        let out = tool_result::<Value>(Err(Box::new(err)));
        assert_eq!(out["isError"], json!(true));
        assert_eq!(
            out["structuredContent"]["error"]["kind"],
            json!("pagination")
        );
    }
    assert_eq!(seen.len(), 0, "a made-up cursor sent a request");
}

// ---------------------------------------------------------------------------------------------
// composition and cancellation

/// Walks and bounded pages through `Buffer` over `ConcurrencyLimit(1)`, dropped at seeded random
/// points (paused time): nothing is leaked, and later walks (two at once) still complete.
#[tokio::test(start_paused = true)]
async fn walks_under_buffer_and_a_limit_of_one_survive_seeded_drops() {
    let inflight = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    struct Guard(Arc<AtomicUsize>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let (inf, cl) = (inflight.clone(), calls.clone());
    let inner = service_fn(move |req: Request<Full<Bytes>>| {
        inf.fetch_add(1, Ordering::SeqCst);
        cl.fetch_add(1, Ordering::SeqCst);
        let guard = Guard(inf.clone());
        let i = num(&req.uri().to_string(), "cursor").unwrap_or(0);
        async move {
            let _g = guard;
            tokio::time::sleep(Duration::from_millis(10)).await;
            let data: Vec<usize> = (i * 4..i * 4 + 4).collect();
            let next = if i < 4 {
                json!((i + 1).to_string())
            } else {
                Value::Null
            };
            let body = json!({"data": data, "next": next}).to_string();
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(body)))
        }
    });
    let stack = tower::buffer::Buffer::new(tower::limit::ConcurrencyLimit::new(inner, 1), 16);
    let pager = Paginate::builder(stack, BASE, JsonCursor::new("/data", "/next"))
        .with_page_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut rng = Rng(0x5363);
    for round in 0..40 {
        let at = Duration::from_millis(rng.below(70));
        if rng.below(2) == 0 {
            let _ = tokio::time::timeout(at, pager.items().try_collect::<Vec<_>>()).await;
        } else {
            let p = pager.clone();
            let h = tokio::spawn(async move { p.page(None, 1 + rng_free(round)).await });
            tokio::time::sleep(at).await;
            h.abort();
            let _ = h.await;
        }
    }
    let a = pager.clone();
    let b = pager.clone();
    let (x, y) = tokio::time::timeout(Duration::from_secs(10), async move {
        tokio::join!(
            a.items().try_collect::<Vec<_>>(),
            b.items().try_collect::<Vec<_>>()
        )
    })
    .await
    .expect("a walk hangs after the drops");
    assert_eq!(nums(&x.unwrap()), (0..20).collect::<Vec<u64>>());
    assert_eq!(nums(&y.unwrap()), (0..20).collect::<Vec<u64>>());
    let p = tokio::time::timeout(Duration::from_secs(10), pager.page(None, 9))
        .await
        .expect("page() hangs")
        .unwrap();
    assert_eq!(nums(&p.items), (0..9).collect::<Vec<u64>>());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        inflight.load(Ordering::SeqCst),
        0,
        "a request is still held"
    );
    assert!(calls.load(Ordering::SeqCst) > 10);
}

fn rng_free(round: usize) -> usize {
    (round * 7) % 13
}

/// Errors mid-walk over the wire through `ClientBuilder`: a 503 and a 429 on page 2 are retried
/// by the stack (each item once); a body cut on page 3 ends the walk with an error after the
/// items before it, and the stream then ends without another request.
#[tokio::test]
async fn retried_and_cut_pages_mid_walk_over_the_wire() {
    type Hits = Arc<Mutex<HashMap<usize, usize>>>;
    async fn handler(
        State(hits): State<Hits>,
        Query(q): Query<HashMap<String, String>>,
    ) -> axum::response::Response {
        let i: usize = q.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
        let n = {
            let mut h = hits.lock().unwrap();
            let e = h.entry(i).or_default();
            *e += 1;
            *e
        };
        match (i, n) {
            (1, 1) => (http::StatusCode::SERVICE_UNAVAILABLE, "busy").into_response(),
            (1, 2) => (
                http::StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "0")],
                "slow down",
            )
                .into_response(),
            (2, _) => {
                let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                    Ok(Bytes::from_static(b"{\"data\": [6, 7")),
                    Err(std::io::Error::other("cut")),
                ];
                let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
                Response::builder()
                    .header("content-type", "application/json")
                    .body(body)
                    .unwrap()
            }
            _ => axum::Json(
                json!({"data": [i * 3, i * 3 + 1, i * 3 + 2], "next": (i + 1).to_string()}),
            )
            .into_response(),
        }
    }
    let hits: Hits = Arc::default();
    let (base, server) = serve(
        Router::new()
            .route("/items", get(handler))
            .with_state(hits.clone()),
    )
    .await;
    let client = ClientBuilder::new()
        .with_retry(fast_retry())
        .with_attempt_timeout(Duration::from_secs(2))
        .build(http_client());
    let pager = Paginate::builder(
        client,
        &format!("{base}/items"),
        JsonCursor::new("/data", "/next"),
    )
    .with_page_timeout(Duration::from_secs(5))
    .build()
    .unwrap();
    let mut s = pager.items();
    let mut items = Vec::new();
    let mut err = None;
    while let Some(x) = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("hangs")
    {
        match x {
            Ok(v) => items.push(v.as_u64().unwrap()),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err.expect("the cut page ends the walk");
    assert_eq!(items, [0, 1, 2, 3, 4, 5], "{err}");
    assert!(
        matches!(err.kind(), ErrorKind::Body | ErrorKind::Transport),
        "a cut body: {:?} {err}",
        err.kind()
    );
    let after = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("hangs");
    assert!(after.is_none(), "the stream goes on after its error");
    let h = hits.lock().unwrap().clone();
    assert_eq!(h.get(&0), Some(&1));
    assert_eq!(h.get(&1), Some(&3), "{h:?}");
    assert_eq!(h.get(&3), None, "a page past the error was fetched: {h:?}");
    server.abort();
}

// ---------------------------------------------------------------------------------------------
// versions

type Notices = Arc<Mutex<Vec<Notice>>>;

fn noted(layer: VersionLayer) -> (VersionLayer, Notices) {
    let n: Notices = Arc::default();
    let log = n.clone();
    (
        layer.on_notice(move |x: &Notice| log.lock().unwrap().push(x.clone())),
        n,
    )
}

/// version.md: the version is pinned "on every request", "a version the caller set is kept":
/// through `ClientBuilder`'s retries over the wire, every attempt carries exactly one
/// `api-version` (the pin, or the caller's), and the notice comes once.
#[tokio::test]
async fn the_version_header_is_on_every_attempt_exactly_once() {
    type Got = Arc<Mutex<Vec<Vec<String>>>>;
    async fn handler(
        State(got): State<Got>,
        headers: axum::http::HeaderMap,
    ) -> axum::response::Response {
        let values: Vec<String> = headers
            .get_all("api-version")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let n = {
            let mut g = got.lock().unwrap();
            g.push(values);
            g.len()
        };
        if n % 3 != 0 {
            (
                http::StatusCode::SERVICE_UNAVAILABLE,
                [("deprecation", "@1688169599")],
                "busy",
            )
                .into_response()
        } else {
            ([("deprecation", "@1688169599")], "ok").into_response()
        }
    }
    let got: Got = Arc::default();
    let (base, server) = serve(
        Router::new()
            .route("/v1/orders", get(handler))
            .with_state(got.clone()),
    )
    .await;
    let (layer, notices) = noted(VersionLayer::header("api-version", "2024-06-01").unwrap());
    let client = ClientBuilder::new()
        .with_retry(fast_retry())
        .with_version(layer)
        .build(http_client());
    let uri = format!("{base}/v1/orders");
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        client
            .clone()
            .oneshot(Request::get(&uri).body(Full::default()).unwrap()),
    )
    .await
    .expect("hangs")
    .unwrap();
    assert_eq!(res.status(), 200);
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        client.clone().oneshot(
            Request::get(&uri)
                .header("api-version", "2023-01-01")
                .body(Full::default())
                .unwrap(),
        ),
    )
    .await
    .expect("hangs")
    .unwrap();
    assert_eq!(res.status(), 200);
    let g = got.lock().unwrap().clone();
    assert_eq!(g.len(), 6, "{g:?}");
    for v in &g[..3] {
        assert_eq!(v, &["2024-06-01"], "{g:?}");
    }
    for v in &g[3..] {
        assert_eq!(v, &["2023-01-01"], "the caller's version, once: {g:?}");
    }
    let n = notices.lock().unwrap().clone();
    assert_eq!(n.len(), 1, "once per endpoint: {n:?}");
    assert_eq!(n[0].endpoint, "GET /v1/orders");
    server.abort();
}

/// version.md: `::query(name, version)` pins the version on every request: one parameter on
/// each attempt of a retried call, none doubled.
#[tokio::test(start_paused = true)]
async fn the_query_version_is_on_every_attempt_exactly_once() {
    let n = Arc::new(AtomicUsize::new(0));
    let seen = Seen::default();
    let (n2, log) = (n.clone(), seen.clone());
    let inner = service_fn(move |req: Request<Full<Bytes>>| {
        log.push(req.uri().to_string(), req.headers().clone());
        let k = n2.fetch_add(1, Ordering::SeqCst);
        let status = if k % 3 == 2 { 200 } else { 503 };
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let client = ClientBuilder::new()
        .with_retry(fast_retry())
        .with_version(VersionLayer::query("api-version", "2024-06-01"))
        .build(inner);
    for uri in [
        "http://api.example.com/v1/orders",
        "http://api.example.com/v1/orders?x=1&y=%20",
        "http://api.example.com/v1/orders?",
    ] {
        let res = client
            .clone()
            .oneshot(Request::get(uri).body(Full::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let uris = seen.uris();
    assert_eq!(uris.len(), 9, "{uris:?}");
    for u in &uris {
        assert_eq!(u.matches("api-version=").count(), 1, "{u}");
        assert_eq!(
            param(u, "api-version").as_deref(),
            Some("2024-06-01"),
            "{u}"
        );
    }
}

/// version.md: "Responses carrying `Deprecation` ... or `Sunset` ... are reported once per
/// endpoint". An endpoint answering an error status (404, 410 Gone, 500, 503) with those headers
/// is the case where the notice matters most.
#[tokio::test]
async fn a_deprecation_on_an_error_response_is_reported() {
    let (layer, notices) = noted(VersionLayer::header("api-version", "1").unwrap());
    let inner = service_fn(|req: Request<()>| async move {
        let status: u16 = req.uri().path().trim_start_matches("/s").parse().unwrap();
        Ok::<_, Infallible>(
            Response::builder()
                .status(status)
                .header("deprecation", "@1688169599")
                .header("sunset", "Sun, 30 Jun 2024 23:59:59 GMT")
                .body(())
                .unwrap(),
        )
    });
    let svc = layer.layer(inner);
    for s in [404u16, 410, 500, 503] {
        let res = svc
            .clone()
            .oneshot(
                Request::get(format!("http://api.example.com/s{s}"))
                    .body(())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), s);
        assert_eq!(
            res.headers()["deprecation"],
            "@1688169599",
            "the response is untouched"
        );
    }
    let mut got: Vec<String> = notices
        .lock()
        .unwrap()
        .iter()
        .map(|n| n.endpoint.clone())
        .collect();
    got.sort();
    assert_eq!(got, ["GET /s404", "GET /s410", "GET /s500", "GET /s503"]);
}

/// version.md: dates in the past, far in the future and before 1970 are read as those dates
/// (`Notice::sunset`, `Notice::deprecation`); `Deprecation: true` is `Some(None)`.
#[tokio::test]
async fn sunset_and_deprecation_dates_at_the_edges_are_read_exactly() {
    let cases: [(&str, &str, Option<Option<i64>>, Option<i64>); 5] = [
        (
            "sunset",
            "Sun, 06 Nov 1994 08:49:37 GMT",
            None,
            Some(784_111_777),
        ),
        (
            "sunset",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            None,
            Some(253_402_300_799),
        ),
        (
            "sunset",
            "Fri, 01 Jan 1960 00:00:00 GMT",
            None,
            Some(-315_619_200),
        ),
        ("deprecation", "@-315619200", Some(Some(-315_619_200)), None),
        ("deprecation", "true", Some(None), None),
    ];
    fn at(secs: i64) -> SystemTime {
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    }
    for (i, (name, value, dep, sun)) in cases.into_iter().enumerate() {
        let (layer, notices) = noted(VersionLayer::query("v", "1"));
        let inner = service_fn(move |_req: Request<()>| async move {
            Ok::<_, Infallible>(Response::builder().header(name, value).body(()).unwrap())
        });
        let res = layer
            .layer(inner)
            .oneshot(
                Request::get(format!("http://api.example.com/c{i}"))
                    .body(())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.headers()[name], value);
        let n = notices.lock().unwrap().clone();
        assert_eq!(n.len(), 1, "{name}: {value}: {n:?}");
        assert_eq!(n[0].deprecation, dep.map(|d| d.map(at)), "{name}: {value}");
        assert_eq!(n[0].sunset, sun.map(at), "{name}: {value}");
    }
}

/// version.md: "A date before 1970 is reported as that date (the warning writes it as
/// `@<unix>`, which an HTTP date cannot hold)". The `tracing` warning names the endpoint.
#[tokio::test(flavor = "current_thread")]
async fn a_pre_1970_sunset_is_written_as_at_unix_in_the_warning() {
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let cap = Capture::default();
    let writer = cap.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let _guard = tracing::subscriber::set_default(sub);
    let inner = service_fn(|_req: Request<()>| async move {
        Ok::<_, Infallible>(
            Response::builder()
                .header("sunset", "Fri, 01 Jan 1960 00:00:00 GMT")
                .body(())
                .unwrap(),
        )
    });
    let svc = VersionLayer::header("api-version", "1")
        .unwrap()
        .layer(inner);
    svc.oneshot(
        Request::get("http://api.example.com/v1/old")
            .body(())
            .unwrap(),
    )
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&cap.0.lock().unwrap()).into_owned();
    assert!(out.contains("WARN"), "{out}");
    assert!(out.contains("GET /v1/old"), "{out}");
    assert!(out.contains("@-315619200"), "{out}");
}

/// lib.rs: "`poll_ready` is the inner service's": under a mock that is not ready, the version
/// service is not ready; once allowed, the request goes down with its pin.
#[tokio::test]
async fn version_poll_ready_is_the_inner_services() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
    handle.allow(0);
    let mut svc = VersionLayer::header("api-version", "7")
        .unwrap()
        .layer(mock);
    let mut task = tokio_test::task::spawn(());
    assert!(task.enter(|cx, _| svc.poll_ready(cx)).is_pending());
    handle.allow(1);
    assert!(task.is_woken());
    assert!(task.enter(|cx, _| svc.poll_ready(cx)).is_ready());
    let fut = svc.call(Request::get("http://api.example.com/x").body(()).unwrap());
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req.headers()["api-version"], "7");
    send.send_response(Response::new(()));
    fut.await.unwrap();
}

/// version.md: "An endpoint is the method and the path, ids included": odd methods and paths,
/// and a URI with no path (read as `/`), never panic and are named as they are.
#[tokio::test]
async fn endpoints_of_odd_methods_and_paths() {
    let (layer, notices) = noted(VersionLayer::query("v", "1"));
    let inner = service_fn(|_req: Request<()>| async move {
        Ok::<_, Infallible>(
            Response::builder()
                .header("deprecation", "true")
                .body(())
                .unwrap(),
        )
    });
    let svc = layer.layer(inner);
    let long = format!("/{}", "a".repeat(60_000));
    let cases = [
        (
            "GET",
            "http://api.example.com".to_owned(),
            "GET /".to_owned(),
        ),
        (
            "PURGE",
            "http://api.example.com/a%20b/..;/c".to_owned(),
            "PURGE /a%20b/..;/c".to_owned(),
        ),
        (
            "DELETE",
            "/v1/orders/42?force=1".to_owned(),
            "DELETE /v1/orders/42".to_owned(),
        ),
        (
            "GET",
            format!("http://api.example.com{long}"),
            format!("GET {long}"),
        ),
    ];
    for (m, u, want) in &cases {
        let req = Request::builder()
            .method(m.as_bytes())
            .uri(u.as_str())
            .body(())
            .unwrap();
        svc.clone().oneshot(req).await.unwrap();
        let last = notices.lock().unwrap().last().map(|n| n.endpoint.clone());
        assert_eq!(
            last.as_deref(),
            Some(want.as_str()),
            "{m} {}",
            &u[..u.len().min(60)]
        );
    }
    assert_eq!(notices.lock().unwrap().len(), 4);
}

/// A version layer under a pager (`LinkHeader`): every page request carries the pinned version
/// once, whatever the server's next links say, and a Sunset on page 2 is one notice.
#[tokio::test]
async fn a_version_pin_under_a_link_walk() {
    let (svc, seen) = api(|uri| match num(uri, "page") {
        Some(2) => (
            200,
            vec![
                (
                    "link",
                    "<http://api.example.com/v1/items?page=3>; rel=next".to_owned(),
                ),
                ("sunset", "Sun, 30 Jun 2024 23:59:59 GMT".to_owned()),
            ],
            "[2,3]".to_owned(),
        ),
        Some(3) => (
            200,
            vec![("sunset", "Mon, 01 Jul 2024 00:00:00 GMT".to_owned())],
            "[4]".to_owned(),
        ),
        _ => (
            200,
            vec![("link", "</v1/items?page=2>; rel=\"next\"".to_owned())],
            "[0,1]".to_owned(),
        ),
    });
    let (layer, notices) = noted(VersionLayer::query("api-version", "2024-06-01"));
    let pager = Paginate::builder(
        layer.layer(svc),
        BASE,
        LinkHeader::new("").without_limit_param(),
    )
    .build()
    .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(items, [0, 1, 2, 3, 4]);
    let uris = seen.uris();
    assert_eq!(uris.len(), 3);
    for u in &uris {
        assert_eq!(u.matches("api-version=2024-06-01").count(), 1, "{u}");
    }
    let n = notices.lock().unwrap().clone();
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].endpoint, "GET /v1/items");
}

// ---------------------------------------------------------------------------------------------
// batch 2: resolution, hostile Link headers, notices that come late, error words

/// paginate.md: `LinkHeader` (RFC 8288, "relative links resolved") and "Pages are known by the
/// URI they are fetched from". RFC 3986 resolution removes dot segments and reads an empty
/// reference as the base itself: each of these next links is the page's own URI, a loop.
#[tokio::test]
async fn next_links_that_resolve_to_the_same_page_are_loops() {
    for link in [
        "<>; rel=next",
        "</v1/./items?page=1>; rel=next",
        "<../v1/items?page=1>; rel=next",
        "<./items?page=1>; rel=next",
        "<items/../items?page=1>; rel=next",
        "<http://api.example.com/v1/x/../items?page=1>; rel=next",
    ] {
        let (svc, seen) =
            api(move |_| (200, vec![("link", link.to_owned())], "[0,1,2]".to_owned()));
        let pager = Paginate::builder(
            svc,
            "http://api.example.com/v1/items?page=1",
            LinkHeader::new("").without_limit_param(),
        )
        .with_max_pages(5)
        .build()
        .unwrap();
        let (items, err) = walk(&pager).await;
        assert_eq!(items, [0, 1, 2], "{link}: fetched again: {:?}", seen.uris());
        let err = err.expect("a loop error");
        assert_eq!(err.kind(), &ErrorKind::Pagination, "{link}: {err}");
    }
}

/// version.md: "a new deprecation is never missed". A first response whose `Sunset` or
/// `Deprecation` cannot be read must not use up the endpoint's one notice: the readable one that
/// follows is reported with its date.
#[tokio::test]
async fn an_unreadable_notice_does_not_hide_the_readable_one_after_it() {
    for (name, bad, good) in [
        ("sunset", "soon", "Sun, 30 Jun 2024 23:59:59 GMT"),
        ("deprecation", "@not-a-number", "@1688169599"),
    ] {
        let (layer, notices) = noted(VersionLayer::query("v", "1"));
        let n = Arc::new(AtomicUsize::new(0));
        let inner = service_fn(move |_req: Request<()>| {
            let k = n.fetch_add(1, Ordering::SeqCst);
            async move {
                let v = if k == 0 { bad } else { good };
                Ok::<_, Infallible>(Response::builder().header(name, v).body(()).unwrap())
            }
        });
        let svc = layer.layer(inner);
        for _ in 0..2 {
            svc.clone()
                .oneshot(
                    Request::get("http://api.example.com/v1/orders")
                        .body(())
                        .unwrap(),
                )
                .await
                .unwrap();
        }
        let got = notices.lock().unwrap().clone();
        let dated: Vec<&Notice> = got
            .iter()
            .filter(|n| n.sunset.is_some() || matches!(n.deprecation, Some(Some(_))))
            .collect();
        assert_eq!(dated.len(), 1, "{name}: {bad:?} then {good:?}: {got:?}");
    }
}

/// Cost stays linear in hostile `Link` headers: 10,000 header lines before the next link, one
/// link with 50,000 parameters, one `rel` with 50,000 relation types; each read in well under a
/// few seconds, and the next link is still found.
#[tokio::test]
async fn hostile_link_headers_cost_linear_time() {
    let lines: Vec<(&'static str, String)> = (0..10_000)
        .map(|i| ("link", format!("</v1/items?page=9&i={i}>; rel=\"item\"")))
        .chain(std::iter::once((
            "link",
            "</v1/items?page=2>; rel=\"next\"".to_owned(),
        )))
        .collect();
    let params = format!("</v1/items?page=2>{}; rel=next", "; a=\"b\"".repeat(50_000));
    let rels = format!("</v1/items?page=2>; rel=\"{}next\"", "x ".repeat(50_000));
    let escapes = format!(
        "</v1/items?page=2>; title=\"{}\"; rel=next",
        "\\\"".repeat(100_000)
    );
    let cases: Vec<(&str, Vec<(&'static str, String)>)> = vec![
        ("10,000 lines", lines),
        ("50,000 params", vec![("link", params)]),
        ("50,000 rel types", vec![("link", rels)]),
        ("100,000 escapes", vec![("link", escapes)]),
    ];
    for (what, headers) in cases {
        let h = Arc::new(headers);
        let (svc, seen) = api(move |uri| {
            if num(uri, "page") == Some(2) {
                (200, vec![], "[9]".to_owned())
            } else {
                (200, (*h).clone(), "[1]".to_owned())
            }
        });
        let pager = Paginate::builder(svc, BASE, LinkHeader::new("").without_limit_param())
            .build()
            .unwrap();
        let t = tokio::time::Instant::now();
        let (items, err) = walk(&pager).await;
        let took = t.elapsed();
        assert!(err.is_none(), "{what}: {err:?}");
        assert_eq!(items, [1, 9], "{what}: {:?}", seen.uris());
        assert!(took < Duration::from_secs(3), "{what}: {took:?}");
    }
}

/// paginate.md Guards: errors "say what happened" and never repeat credentials: a next link
/// carrying userinfo and a signed query, whose page then fails (500, bad JSON, a stall), gives
/// errors whose Display, Debug and agent summary hold neither.
#[tokio::test(start_paused = true)]
async fn failing_pages_behind_a_secret_next_link_keep_the_secret() {
    for mode in ["500", "json", "stall", "404"] {
        let (svc, _seen) = api(move |uri| {
            if num(uri, "page") == Some(2) {
                match mode {
                    "500" => (500, vec![], "oops".to_owned()),
                    "404" => (404, vec![], "gone".to_owned()),
                    _ => (200, vec![], "{not json".to_owned()),
                }
            } else {
                (
                    200,
                    vec![(
                        "link",
                        "<http://agent:hunter2@api.example.com/v1/items?page=2&sig=S3CR3T>; rel=next"
                            .to_owned(),
                    )],
                    "[0]".to_owned(),
                )
            }
        });
        let stalls = mode == "stall";
        let svc = svc.map_future(move |f| async move {
            if stalls {
                std::future::pending::<()>().await;
            }
            f.await
        });
        let pager = Paginate::builder(svc, BASE, LinkHeader::new("").without_limit_param())
            .with_page_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let (items, err) = walk(&pager).await;
        let err = err.expect("page 2 fails");
        if !stalls {
            assert_eq!(items, [0], "{mode}");
        }
        let summary = ErrorSummary::of(&err);
        let shown = format!("{err}\n{err:?}");
        let all = format!(
            "{shown}\n{}\n{}",
            serde_json::to_string(&summary).unwrap(),
            tool_result::<Value>(Err(Box::new(err)))
        );
        assert!(!all.contains("hunter2"), "{mode}: {all}");
        assert!(!all.contains("S3CR3T"), "{mode}: {all}");
        let want = match mode {
            "500" => "server_error",
            "404" => "client_error",
            "json" => "pagination",
            _ => "timeout",
        };
        assert_eq!(summary.kind, want, "{mode}: {all}");
        assert_eq!(
            summary.retryable,
            matches!(mode, "500" | "stall"),
            "{mode}: {all}"
        );
    }
}

/// A kept `ClientBuilder` client under `Buffer` and `ConcurrencyLimit(1)` over the wire: a walk
/// aborted while its page is in flight frees the slot; two walks then run to the end.
#[tokio::test]
async fn an_aborted_walk_over_a_buffered_limit_of_one_frees_its_slot() {
    async fn handler(Query(q): Query<HashMap<String, String>>) -> axum::response::Response {
        let i: usize = q.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
        if q.contains_key("slow") {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        let next = if i < 3 {
            json!((i + 1).to_string())
        } else {
            Value::Null
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        axum::Json(json!({"data": [i * 2, i * 2 + 1], "next": next})).into_response()
    }
    let (base, server) = serve(Router::new().route("/items", get(handler))).await;
    let client = ClientBuilder::new()
        .with_retry(fast_retry())
        .build(http_client());
    let stack = tower::buffer::Buffer::new(tower::limit::ConcurrencyLimit::new(client, 1), 8);
    let slow = Paginate::builder(
        stack.clone(),
        &format!("{base}/items?slow=1"),
        JsonCursor::new("/data", "/next"),
    )
    .build()
    .unwrap();
    let fast = Paginate::builder(
        stack,
        &format!("{base}/items"),
        JsonCursor::new("/data", "/next"),
    )
    .with_page_timeout(Duration::from_secs(5))
    .build()
    .unwrap();
    let s2 = slow.clone();
    let h = tokio::spawn(async move { s2.items().try_collect::<Vec<_>>().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.abort();
    let _ = h.await;
    let _ = tokio::time::timeout(Duration::from_millis(50), slow.page(None, 3)).await;
    let (a, b) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(fast.items().try_collect::<Vec<_>>(), fast.page(None, 5))
    })
    .await
    .expect("the slot was not freed");
    assert_eq!(nums(&a.unwrap()), (0..8).collect::<Vec<u64>>());
    assert_eq!(nums(&b.unwrap().items), (0..5).collect::<Vec<u64>>());
    server.abort();
}

// ---------------------------------------------------------------------------------------------
// batch 3: totals with uneven pages, parameters already in the first URI, the agents example

/// strategy.rs `PageNumber::with_total`: "It never stops before the total"; paginate.md: "every
/// item is read once". A server whose pages are not all the same length (it drops rows it will
/// not show after paging: 3, 10, 10, then 2 of a total of 25) must still be read to the total.
#[tokio::test]
#[ignore = "as documented: PageNumber::with_total and paginate.md say a server whose pages vary in length can end the walk before the total (no page number can tell); this test asks for more"]
async fn page_number_with_a_total_and_uneven_pages_reads_to_the_total() {
    let (svc, seen) = api(|uri| {
        let page = num(uri, "page").unwrap_or(1);
        let data: Vec<u64> = match page {
            1 => (0..3).collect(),
            2 => (3..13).collect(),
            3 => (13..23).collect(),
            4 => (23..25).collect(),
            _ => vec![],
        };
        (200, vec![], json!({"data": data, "total": 25}).to_string())
    });
    let pager = Paginate::builder(svc, BASE, PageNumber::new("/data").with_total("/total"))
        .with_page_size(10)
        .build()
        .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(items, (0..25).collect::<Vec<u64>>(), "{:?}", seen.uris());
}

/// paginate.md / strategy.rs: the page size is "asked of the server" in the strategy's
/// parameter. A first-page URI that already names that parameter (and the cursor, page or
/// offset) must not be sent with the parameter twice, saying two sizes or two positions.
#[tokio::test]
async fn parameters_already_in_the_first_uri_are_not_sent_twice() {
    type Mk = fn() -> (
        Box<dyn Fn(&str) -> Answer + Send + Sync>,
        &'static [&'static str],
    );
    async fn check<P: PageStrategy>(pager: Paginate<P>, seen: &Seen, names: &[&str], what: &str) {
        let _ = walk(&pager).await;
        let _ = pager.page(None, 5).await;
        assert!(seen.len() >= 2, "{what}");
        for u in seen.uris() {
            let q = u.split_once('?').map_or("", |x| x.1);
            for n in names {
                let count = q
                    .split('&')
                    .filter(|kv| kv.split('=').next() == Some(n))
                    .count();
                assert!(count <= 1, "{what}: {n} {count} times in {u}");
            }
        }
    }
    let empty = |_: &str| (200, vec![], json!({"data": [], "next": null}).to_string());
    let link_empty = |_: &str| (200, vec![], "[]".to_owned());
    let _: Option<Mk> = None;

    let (svc, seen) = api(empty);
    let p = Paginate::builder(
        svc,
        "http://api.example.com/v1/items?limit=50&cursor=abc",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(10)
    .build()
    .unwrap();
    check(p, &seen, &["limit"], "JsonCursor").await;

    let (svc, seen) = api(link_empty);
    let p = Paginate::builder(
        svc,
        "http://api.example.com/v1/items?per_page=50",
        LinkHeader::new(""),
    )
    .with_page_size(10)
    .build()
    .unwrap();
    check(p, &seen, &["per_page"], "LinkHeader").await;

    let (svc, seen) = api(empty);
    let p = Paginate::builder(
        svc,
        "http://api.example.com/v1/items?page=1&per_page=50",
        PageNumber::new("/data"),
    )
    .with_page_size(10)
    .build()
    .unwrap();
    check(p, &seen, &["page", "per_page"], "PageNumber").await;

    let (svc, seen) = api(empty);
    let p = Paginate::builder(
        svc,
        "http://api.example.com/v1/items?offset=0&limit=50",
        OffsetLimit::new("/data"),
    )
    .with_page_size(10)
    .build()
    .unwrap();
    check(p, &seen, &["offset", "limit"], "OffsetLimit").await;
}

/// agents.md, "Results the model can act on": a 429 asking for 2 minutes, longer than the retry
/// layer waits (60 s), on a call without an idempotency key (the example's `"idempotency_key":
/// null`), gives `rate_limited`, no status, `retry_after_ms` 120000, retryable, "may have been
/// processed", one attempt, and the text's second line is the example's advice.
#[tokio::test]
async fn the_agents_guide_rate_limited_example_holds_over_the_wire() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    let router = Router::new().route(
        "/orders",
        get(move || {
            let h = h2.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                (
                    http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "120")],
                    "slow down",
                )
            }
        }),
    );
    let (base, server) = serve(router).await;
    let client = ClientBuilder::new().build(http_client());
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        client.oneshot(
            Request::get(format!("{base}/orders"))
                .body(Full::default())
                .unwrap(),
        ),
    )
    .await
    .expect("the call waited for the 2 minutes");
    let out = tool_result::<Value>(res.map(|_| json!("unexpected success")));
    let e = &out["structuredContent"]["error"];
    assert_eq!(out["isError"], json!(true), "{out}");
    assert_eq!(e["kind"], json!("rate_limited"), "{out}");
    assert_eq!(e["status"], Value::Null, "{out}");
    assert_eq!(e["retryable"], json!(true), "{out}");
    assert_eq!(e["retry_after_ms"], json!(120_000), "{out}");
    assert_eq!(e["may_have_been_processed"], json!(true), "{out}");
    assert_eq!(e["attempts"], json!(1), "{out}");
    assert_eq!(
        e["idempotency_key"],
        Value::Null,
        "a GET carries no key: {out}"
    );
    let text = out["content"][0]["text"].as_str().unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("retry after 2m"), "{text}");
    assert_eq!(
        lines[1],
        "Try again in 2m; it may already have been processed, so check before sending it again.",
        "{text}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    server.abort();
}

/// agents.md: "`.without_retries()` for a probe": one attempt against a failing server, whose
/// summary says the status.
#[tokio::test]
async fn a_probe_without_retries_makes_one_attempt() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    let router = Router::new().route(
        "/health",
        get(move || {
            let h = h2.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                (http::StatusCode::SERVICE_UNAVAILABLE, "down")
            }
        }),
    );
    let (base, server) = serve(router).await;
    let client = ClientBuilder::new()
        .with_retry(fast_retry())
        .build(http_client());
    let mut req = Request::get(format!("{base}/health"))
        .body(Full::default())
        .unwrap();
    req.extensions_mut()
        .insert(sturdy::core::CallOptions::new().without_retries());
    let res = tokio::time::timeout(Duration::from_secs(5), client.clone().oneshot(req))
        .await
        .expect("hangs");
    let status = match &res {
        Ok(r) => r.status().as_u16(),
        Err(e) => ErrorSummary::of(&**e).status.unwrap_or(0),
    };
    assert_eq!(status, 503);
    assert_eq!(hits.load(Ordering::SeqCst), 1, "a probe is one attempt");
    // Without the option the same call is retried (4 attempts in all).
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        client.oneshot(
            Request::get(format!("{base}/health"))
                .body(Full::default())
                .unwrap(),
        ),
    )
    .await
    .expect("hangs");
    drop(res);
    assert_eq!(hits.load(Ordering::SeqCst), 5);
    server.abort();
}

/// A strategy of one's own that records how each `RawPage` reads in `Debug`.
struct Recording {
    inner: LinkHeader,
    shown: Arc<Mutex<Vec<String>>>,
}

impl PageStrategy for Recording {
    fn uri(
        &self,
        base: &http::Uri,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<http::Uri, sturdy::core::Error> {
        self.inner.uri(base, cursor, limit)
    }
    fn parse(
        &self,
        page: &sturdy::paginate::RawPage,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<sturdy::paginate::Parsed, sturdy::core::Error> {
        self.shown.lock().unwrap().push(format!("{page:?}"));
        self.inner.parse(page, cursor, limit)
    }
    fn cursors_are_urls(&self) -> bool {
        self.inner.cursors_are_urls()
    }
}

/// strategy.rs `RawPage`: "Its `Debug` output shows the URI without userinfo or query, which may
/// hold a credential" — for the first page's URI and for a page reached through a next link.
/// A strategy of one's own that says its cursors are URLs gets the origin guard too.
#[tokio::test]
async fn raw_page_debug_hides_credentials_and_own_strategies_get_the_origin_guard() {
    let (svc, seen) = api(|uri| {
        if num(uri, "page") == Some(2) {
            (
                200,
                vec![(
                    "link",
                    "<http://evil.example.net/steal?page=3>; rel=next".to_owned(),
                )],
                "[1]".to_owned(),
            )
        } else {
            (
                200,
                vec![("link", "<http://u2:pw2SECRET@api.example.com/v1/items?page=2&sig=SIG2SECRET>; rel=next".to_owned())],
                "[0]".to_owned(),
            )
        }
    });
    let shown: Arc<Mutex<Vec<String>>> = Arc::default();
    let strategy = Recording {
        inner: LinkHeader::new("").without_limit_param(),
        shown: shown.clone(),
    };
    let pager = Paginate::builder(
        svc,
        "http://u1:pw1SECRET@api.example.com/v1/items?token=TOKSECRET",
        strategy,
    )
    .build()
    .unwrap();
    let (items, err) = walk(&pager).await;
    let err = err.expect("the foreign link is refused");
    assert_eq!(items, [0, 1]);
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    assert_eq!(seen.len(), 2, "{:?}", seen.uris());
    let shown = shown.lock().unwrap().clone();
    assert_eq!(shown.len(), 2);
    for d in &shown {
        assert!(!d.contains("pw1SECRET") && !d.contains("TOKSECRET"), "{d}");
    }
    // Page 2's own URI (reached through the next link) is shown without them too.
    assert!(
        shown[1].contains("uri: \"http://…@api.example.com/v1/items?…\""),
        "{}",
        shown[1]
    );
}

/// The same `RawPage` `Debug` shows the response headers as they came: the `Link` header of
/// page 1 holds page 2's userinfo and signed query, which `Page`'s `Debug` ("a next link may
/// carry credentials") and the URI field both take care to hide.
#[tokio::test]
async fn raw_page_debug_does_not_show_a_next_links_credentials_through_its_headers() {
    let (svc, _seen) = api(|uri| {
        if num(uri, "page") == Some(2) {
            (200, vec![], "[1]".to_owned())
        } else {
            (
                200,
                vec![("link", "<http://u2:pw2SECRET@api.example.com/v1/items?page=2&sig=SIG2SECRET>; rel=next".to_owned())],
                "[0]".to_owned(),
            )
        }
    });
    let shown: Arc<Mutex<Vec<String>>> = Arc::default();
    let strategy = Recording {
        inner: LinkHeader::new("").without_limit_param(),
        shown: shown.clone(),
    };
    let pager = Paginate::builder(svc, BASE, strategy).build().unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(items, [0, 1]);
    let shown = shown.lock().unwrap().clone();
    let pages: Vec<String> = pager
        .pages()
        .map(|p| format!("{:?}", p.unwrap()))
        .collect()
        .await;
    for d in &pages {
        assert!(!d.contains("SECRET"), "Page Debug: {d}");
    }
    for d in &shown {
        assert!(
            !d.contains("pw2SECRET") && !d.contains("SIG2SECRET"),
            "RawPage Debug: {d}"
        );
    }
}
