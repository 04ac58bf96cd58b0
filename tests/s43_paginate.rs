//! Pagination per docs/guides/paginate.md, the `sturdy_paginate` rustdoc and the "Bounded pages"
//! part of docs/guides/agents.md: RFC 8288 Link headers with hostile values (quoted commas,
//! relative targets, thousands of links, a huge target, another host or scheme, loops, endless
//! empty pages), bounded pages and their exact bounds, signed cursors, the guards' kinds and
//! words, and a stream dropped mid-page. In-process services, paused time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{Request, Response, Uri};
use http_body_util::Full;
use serde_json::{json, Value};
use sturdy::core::ErrorKind;
use sturdy::paginate::{JsonCursor, LinkHeader, Page, Paginate, MAX_CURSOR_LEN};

use crate::s43_util::Fut;

type Answer = (u16, Vec<(&'static str, String)>, String);

/// A site answering from `f`, logging every URI asked for.
#[derive(Clone)]
struct Site {
    log: Arc<Mutex<Vec<String>>>,
    f: Arc<dyn Fn(&Uri) -> Answer + Send + Sync>,
}

impl Site {
    fn new(f: impl Fn(&Uri) -> Answer + Send + Sync + 'static) -> Self {
        Self {
            log: Arc::default(),
            f: Arc::new(f),
        }
    }

    fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = Fut<Result<Response<Full<Bytes>>, Infallible>>,
    > + Clone
           + Send
           + Sync
           + 'static {
        let this = self.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            this.log.lock().unwrap().push(req.uri().to_string());
            let (status, headers, body) = (this.f)(req.uri());
            let mut res = Response::builder().status(status);
            for (k, v) in headers {
                res = res.header(k, v);
            }
            let res = res.body(Full::from(body)).unwrap();
            let fut: Fut<Result<Response<Full<Bytes>>, Infallible>> =
                Box::pin(async move { Ok(res) });
            fut
        })
    }

    fn asked(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// A site of `pages`: each URI maps to its items and its Link header values.
fn link_site(pages: Vec<(&'static str, Vec<i64>, Vec<String>)>) -> Site {
    let map: HashMap<String, (Vec<i64>, Vec<String>)> = pages
        .into_iter()
        .map(|(u, items, links)| (u.to_owned(), (items, links)))
        .collect();
    // A `page()` call's first page carries `?per_page=`: the same page.
    Site::new(
        move |uri| match map.get(uri.to_string().split("?per_page=").next().unwrap()) {
            Some((items, links)) => (
                200,
                links.iter().map(|l| ("link", l.clone())).collect(),
                json!(items).to_string(),
            ),
            None => (404, vec![], "{}".into()),
        },
    )
}

async fn walk<P: sturdy::paginate::PageStrategy>(
    pager: &Paginate<P>,
) -> (Vec<Page>, Option<sturdy::core::Error>) {
    let mut pages = Vec::new();
    let mut s = pager.pages();
    let end = tokio::time::timeout(Duration::from_secs(600), async {
        while let Some(r) = s.next().await {
            match r {
                Ok(p) => pages.push(p),
                Err(e) => return Some(e),
            }
        }
        None
    })
    .await
    .expect("the walk did not end");
    (pages, end)
}

fn items_of(pages: &[Page]) -> Vec<Value> {
    pages.iter().flat_map(|p| p.items.clone()).collect()
}

const BASE: &str = "https://api.example.com/v1/items";

#[tokio::test(start_paused = true)]
async fn a_quoted_comma_and_a_fake_rel_in_a_parameter_do_not_make_a_next_link() {
    let site = link_site(vec![
        (
            BASE,
            vec![1, 2],
            vec![r#"<https://api.example.com/evil>; title="x, <https://api.example.com/evil2>; rel=next", <?page=2>; rel="next""#.into()],
        ),
        ("https://api.example.com/v1/items?page=2", vec![3], vec![]),
    ]);
    let pager = Paginate::new(site.service(), BASE, LinkHeader::new("")).unwrap();
    let (pages, end) = walk(&pager).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(items_of(&pages), [json!(1), json!(2), json!(3)]);
    assert_eq!(
        site.asked(),
        [BASE, "https://api.example.com/v1/items?page=2"]
    );
}

#[tokio::test(start_paused = true)]
async fn relative_next_links_resolve_against_the_page_uri() {
    for (target, resolved) in [
        ("<?page=2>", "https://api.example.com/v1/items?page=2"),
        ("<items2>", "https://api.example.com/v1/items2"),
        ("</v2/items?p=2>", "https://api.example.com/v2/items?p=2"),
        ("<../other>", "https://api.example.com/other"),
        (
            "<//api.example.com/x?page=2>",
            "https://api.example.com/x?page=2",
        ),
        (
            "<https://API.example.com:443/y>",
            "https://API.example.com:443/y",
        ),
    ] {
        let resolved: &'static str = Box::leak(resolved.to_owned().into_boxed_str());
        let site = link_site(vec![
            (BASE, vec![1], vec![format!("{target}; rel=\"next\"")]),
            (resolved, vec![2], vec![]),
        ]);
        let pager = Paginate::new(site.service(), BASE, LinkHeader::new("")).unwrap();
        let (pages, end) = walk(&pager).await;
        assert!(end.is_none(), "{target}: {end:?} after {:?}", site.asked());
        assert_eq!(items_of(&pages), [json!(1), json!(2)], "{target}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_next_link_is_found_after_five_thousand_other_links_and_in_a_second_field() {
    let many: Vec<String> = (0..5_000)
        .map(|n| format!("</v1/things/{n}>; rel=\"item\""))
        .collect();
    let site = link_site(vec![
        (
            BASE,
            vec![1],
            vec![many.join(", "), r#"</v1/items?page=2>; REL="Next""#.into()],
        ),
        ("https://api.example.com/v1/items?page=2", vec![2], vec![]),
    ]);
    let pager = Paginate::new(site.service(), BASE, LinkHeader::new("")).unwrap();
    let (pages, end) = walk(&pager).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(items_of(&pages), [json!(1), json!(2)]);
}

#[tokio::test(start_paused = true)]
async fn a_megabyte_next_link_ends_the_walk_with_a_short_error_and_no_hang() {
    let huge = format!("</v1/items?c={}>; rel=\"next\"", "a".repeat(1 << 20));
    let site = link_site(vec![(BASE, vec![1], vec![huge])]);
    let pager = Paginate::new(site.service(), BASE, LinkHeader::new("")).unwrap();
    let (pages, end) = walk(&pager).await;
    assert_eq!(items_of(&pages), [json!(1)]);
    if let Some(e) = end {
        assert_eq!(*e.kind(), ErrorKind::Pagination, "{e}");
        assert!(
            e.to_string().len() < 4096,
            "a {} byte message",
            e.to_string().len()
        );
    }
    // Whatever was asked, it was not on another origin.
    assert!(site
        .asked()
        .iter()
        .all(|u| u.starts_with("https://api.example.com/")));
}

#[tokio::test(start_paused = true)]
async fn a_next_link_to_another_host_or_scheme_is_refused_unless_allowed() {
    for foreign in [
        "https://robot:pa55@evil.example.net/v1/items?token=qs3cret",
        "http://api.example.com/v1/items?page=2&token=qs3cret",
        "https://api.example.com:8443/v1/items?token=qs3cret",
    ] {
        let site = link_site(vec![
            (BASE, vec![1], vec![format!("<{foreign}>; rel=\"next\"")]),
            (foreign, vec![2], vec![]),
        ]);
        let pager = Paginate::new(site.service(), BASE, LinkHeader::new("")).unwrap();
        let (pages, end) = walk(&pager).await;
        assert_eq!(items_of(&pages), [json!(1)], "{foreign}");
        let e = end.unwrap_or_else(|| panic!("{foreign} was followed"));
        assert_eq!(*e.kind(), ErrorKind::Pagination, "{e}");
        let text = crate::s43_util::chain(&e);
        assert!(
            !text.contains("qs3cret") && !text.contains("pa55"),
            "{text}"
        );
        assert_eq!(site.asked(), [BASE], "{foreign}");
        // A page()'s call refuses it too, before fetching it.
        let err = pager.page(None, 5).await.map(|_| ()).unwrap_err();
        assert!(!crate::s43_util::chain(&err).contains("qs3cret"), "{err}");

        let allowed = Paginate::builder(site.service(), BASE, LinkHeader::new(""))
            .with_foreign_origin_allowed(true)
            .build()
            .unwrap();
        let (pages, end) = walk(&allowed).await;
        assert!(end.is_none(), "{foreign}: {end:?}");
        assert_eq!(items_of(&pages), [json!(1), json!(2)]);
    }
}

#[tokio::test(start_paused = true)]
async fn a_next_link_back_to_an_earlier_page_is_yielded_then_a_loop_error() {
    let site = link_site(vec![
        (BASE, vec![1], vec!["<?page=2>; rel=\"next\"".into()]),
        (
            "https://api.example.com/v1/items?page=2",
            vec![2],
            vec![format!("<{BASE}>; rel=\"next\"")],
        ),
    ]);
    let pager = Paginate::new(site.service(), BASE, LinkHeader::new("")).unwrap();
    let (pages, end) = walk(&pager).await;
    assert_eq!(items_of(&pages), [json!(1), json!(2)]);
    let e = end.expect("no loop error");
    assert_eq!(*e.kind(), ErrorKind::Pagination);
    assert!(e.to_string().contains("loop"), "{e}");
    assert_eq!(site.asked().len(), 2);

    // A page whose next link is itself.
    let site = link_site(vec![(
        BASE,
        vec![1],
        vec![format!("<{BASE}>; rel=\"next\"")],
    )]);
    let pager = Paginate::new(site.service(), BASE, LinkHeader::new("")).unwrap();
    let (pages, end) = walk(&pager).await;
    assert_eq!(items_of(&pages), [json!(1)]);
    assert!(end.is_some());
    assert_eq!(site.asked().len(), 1);
    // page() fails rather than loop.
    assert!(pager.page(None, 5).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn endless_empty_pages_stop_at_max_pages_exactly() {
    let site = Site::new(|uri| {
        let n: u64 = uri
            .query()
            .and_then(|q| q.strip_prefix("p="))
            .map_or(1, |p| p.parse().unwrap());
        (
            200,
            vec![("link", format!("<?p={}>; rel=\"next\"", n + 1))],
            "[]".into(),
        )
    });
    let pager = Paginate::builder(site.service(), BASE, LinkHeader::new(""))
        .with_max_pages(5)
        .build()
        .unwrap();
    let (pages, end) = walk(&pager).await;
    assert_eq!(pages.len(), 5);
    let e = end.expect("no bound error");
    assert_eq!(*e.kind(), ErrorKind::Pagination);
    assert!(e.to_string().contains("max_pages"), "{e}");
    assert_eq!(site.asked().len(), 5);
    let err = pager.page(None, 3).await.map(|_| ()).unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::Pagination, "{err}");
}

/// A JSON-cursor API of `total` items that serves at most `cap` per page.
fn cursor_site(total: usize, cap: usize) -> Site {
    cursor_site_with(total, cap, false)
}

/// The same; with `ignore_limit`, pages are always `cap` items whatever was asked.
fn cursor_site_with(total: usize, cap: usize, ignore_limit: bool) -> Site {
    Site::new(move |uri| {
        let q: HashMap<String, String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let start: usize = q.get("cursor").map_or(0, |c| c.parse().unwrap());
        let mut limit: usize = q.get("limit").map_or(cap, |l| l.parse().unwrap()).min(cap);
        if ignore_limit {
            limit = cap;
        }
        let end = (start + limit).min(total);
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

#[tokio::test(start_paused = true)]
async fn bounded_pages_return_exactly_the_limit_and_resume_inside_a_server_page() {
    // Pages of 10 whatever is asked: calls of 7 end inside server pages.
    let site = cursor_site_with(45, 10, true);
    let pager = Paginate::new(site.service(), BASE, JsonCursor::new("/data", "/next")).unwrap();
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    let mut calls = 0;
    loop {
        let p = pager.page(cursor.as_deref(), 7).await.unwrap();
        calls += 1;
        assert!(p.items.len() <= 7);
        all.extend(p.items.iter().map(|v| v.as_u64().unwrap()));
        assert_eq!(p.has_more, p.next_cursor.is_some());
        if !p.has_more {
            break;
        }
        assert_eq!(p.items.len(), 7);
        cursor = p.next_cursor;
        assert!(calls < 20);
    }
    assert_eq!(all, (0..45).collect::<Vec<_>>());
    // limit 0 reads as 1
    let one = pager.page(None, 0).await.unwrap();
    assert_eq!(one.items, [json!(0)]);
    // It serialises as is.
    let v = serde_json::to_value(&one).unwrap();
    assert_eq!(v["items"], json!([0]));
    assert_eq!(v["has_more"], json!(true));
    assert!(v["next_cursor"].is_string());
}

#[tokio::test(start_paused = true)]
async fn page_asks_for_min_limit_100_and_honours_at_most_max_items() {
    let site = cursor_site(1_000, 1_000);
    let pager = Paginate::builder(site.service(), BASE, JsonCursor::new("/data", "/next"))
        .with_max_items(150)
        .build()
        .unwrap();
    let p = pager.page(None, 250).await.unwrap();
    assert_eq!(
        p.items.len(),
        150,
        "a limit above max_items reads as max_items"
    );
    assert!(p.has_more);
    assert!(
        site.asked().iter().all(|u| u.contains("limit=100")),
        "{:?}",
        site.asked()
    );
    let p = pager.page(None, 30).await.unwrap();
    assert_eq!(p.items.len(), 30);
    assert!(site.asked().last().unwrap().contains("limit=30"));
}

#[tokio::test(start_paused = true)]
async fn a_page_call_needing_more_than_max_pages_fails_and_one_needing_exactly_that_succeeds() {
    let site = cursor_site(100, 2);
    let pager = Paginate::builder(site.service(), BASE, JsonCursor::new("/data", "/next"))
        .with_max_pages(3)
        .build()
        .unwrap();
    let p = pager.page(None, 6).await.unwrap();
    assert_eq!(p.items.len(), 6);
    let err = pager.page(None, 7).await.map(|_| ()).unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::Pagination, "{err}");
    assert!(err.to_string().contains("max_pages"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_walk_stops_after_exactly_max_items_with_an_error_saying_so() {
    let site = cursor_site(100, 7);
    let pager = Paginate::builder(site.service(), BASE, JsonCursor::new("/data", "/next"))
        .with_max_items(20)
        .build()
        .unwrap();
    let mut s = pager.items();
    let mut n = 0;
    let err = loop {
        match s.next().await {
            Some(Ok(_)) => n += 1,
            Some(Err(e)) => break e,
            None => panic!("ended without an error after {n}"),
        }
    };
    assert_eq!(n, 20);
    assert_eq!(*err.kind(), ErrorKind::Pagination);
    assert!(err.to_string().contains("max_items"), "{err}");
    // Exactly the bound in total is no error.
    let site = cursor_site(20, 7);
    let pager = Paginate::builder(site.service(), BASE, JsonCursor::new("/data", "/next"))
        .with_max_items(20)
        .build()
        .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 20);
}

#[tokio::test(start_paused = true)]
async fn cursors_it_did_not_return_are_refused_before_any_request() {
    let site = cursor_site(45, 10);
    let key = [7u8; 32];
    let pager = Paginate::builder(site.service(), BASE, JsonCursor::new("/data", "/next"))
        .with_cursor_key(key)
        .build()
        .unwrap();
    let c = pager.page(None, 5).await.unwrap().next_cursor.unwrap();
    let asked = site.asked().len();
    let mut edited = c.clone().into_bytes();
    let mid = edited.len() / 2;
    edited[mid] = if edited[mid] == b'A' { b'B' } else { b'A' };
    let edited = String::from_utf8(edited).unwrap();
    let other = Paginate::new(site.service(), BASE, JsonCursor::new("/data", "/next")).unwrap();
    let elsewhere = Paginate::builder(
        site.service(),
        "https://api.example.com/v1/other",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(key)
    .build()
    .unwrap();
    let long = "A".repeat(MAX_CURSOR_LEN + 1);
    for (what, p, cursor) in [
        ("edited", &pager, edited.as_str()),
        ("truncated", &pager, &c[..c.len() - 2]),
        ("made up", &pager, "eyJjIjoiOTk5In0"),
        ("empty", &pager, ""),
        ("too long", &pager, long.as_str()),
        ("another pager's key", &other, c.as_str()),
        ("another endpoint", &elsewhere, c.as_str()),
    ] {
        let err = p.page(Some(cursor), 5).await.map(|_| ()).expect_err(what);
        assert_eq!(*err.kind(), ErrorKind::Pagination, "{what}: {err}");
        assert_eq!(site.asked().len(), asked, "{what}: a request was sent");
    }
    // The same key and URI: the cursor is good in another pager (a restart).
    let again = Paginate::builder(site.service(), BASE, JsonCursor::new("/data", "/next"))
        .with_cursor_key(key)
        .build()
        .unwrap();
    assert_eq!(again.page(Some(&c), 5).await.unwrap().items[0], json!(5));
}

#[tokio::test(start_paused = true)]
async fn build_reports_every_mistake_as_config_before_any_page() {
    let site = cursor_site(5, 5);
    let jc = || JsonCursor::new("/data", "/next");
    let b = || Paginate::builder(site.service(), BASE, jc());
    let cases = vec![
        ("max_pages 0", b().with_max_pages(0).build().map(|_| ())),
        ("max_items 0", b().with_max_items(0).build().map(|_| ())),
        ("page size 0", b().with_page_size(0).build().map(|_| ())),
        (
            "page bytes 0",
            b().with_max_page_bytes(0).build().map(|_| ()),
        ),
        (
            "timeout 0",
            b().with_page_timeout(Duration::ZERO).build().map(|_| ()),
        ),
        (
            "short key",
            b().with_cursor_key([1u8; 31]).build().map(|_| ()),
        ),
        (
            "relative uri",
            Paginate::builder(site.service(), "/v1/items", jc())
                .build()
                .map(|_| ()),
        ),
        (
            "pointer",
            Paginate::builder(site.service(), BASE, JsonCursor::new("data", "/next"))
                .build()
                .map(|_| ()),
        ),
        (
            "param",
            Paginate::builder(site.service(), BASE, jc().with_cursor_param(""))
                .build()
                .map(|_| ()),
        ),
        (
            "link pointer",
            Paginate::builder(site.service(), BASE, LinkHeader::new("items"))
                .build()
                .map(|_| ()),
        ),
    ];
    for (what, r) in cases {
        let e = r.expect_err(what);
        assert_eq!(*e.kind(), ErrorKind::Config, "{what}: {e}");
    }
    assert!(site.asked().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stream_dropped_mid_page_drops_the_request_and_fetches_nothing_more() {
    let dropped = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let (d, s) = (dropped.clone(), started.clone());
    let svc = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let flag = Flag(d.clone());
        s.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(flag);
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(
                r#"{"data":[1],"next":"x"}"#,
            )))
        }
    });
    let pager = Paginate::new(svc, BASE, JsonCursor::new("/data", "/next")).unwrap();
    let mut stream = tokio_test::task::spawn(pager.items());
    tokio_test::assert_pending!(stream.poll_next());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(started.load(Ordering::SeqCst), 1);
    assert!(!dropped.load(Ordering::SeqCst));
    drop(stream);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the page request outlived its stream"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(started.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stalls_after_the_head_fails_at_the_page_timeout() {
    let svc = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        let body = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<Bytes>, Infallible>,
        >());
        Ok::<_, Infallible>(Response::new(body))
    });
    let pager = Paginate::builder(svc, BASE, JsonCursor::new("/data", "/next"))
        .with_page_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let err = pager.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(*err.kind(), ErrorKind::Timeout, "{err}");
    let start = tokio::time::Instant::now();
    let err = pager.page(None, 5).await.map(|_| ()).unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(*err.kind(), ErrorKind::Timeout, "{err}");
}

#[tokio::test(start_paused = true)]
async fn guards_for_size_status_and_bad_json_have_the_documented_kinds() {
    let site = Site::new(|uri| match uri.query() {
        None => (
            200,
            vec![],
            json!({"data": [1, 2], "next": "2"}).to_string(),
        ),
        Some("cursor=2") => (503, vec![], "busy".into()),
        Some("cursor=3") => (200, vec![], "{not json".into()),
        _ => (
            200,
            vec![],
            json!({"data": ["x".repeat(5000)], "next": null}).to_string(),
        ),
    });
    let jc = JsonCursor::new("/data", "/next").without_limit_param();
    let pager = Paginate::new(site.service(), BASE, jc.clone()).unwrap();
    let (pages, end) = walk(&pager).await;
    assert_eq!(items_of(&pages), [json!(1), json!(2)]);
    let e = end.unwrap();
    assert_eq!(
        *e.kind(),
        ErrorKind::Server(http::StatusCode::SERVICE_UNAVAILABLE),
        "{e}"
    );

    let site = Site::new(|uri| match uri.query() {
        None => (200, vec![], json!({"data": [1], "next": "3"}).to_string()),
        _ => (200, vec![], "{not json".into()),
    });
    let pager = Paginate::new(site.service(), BASE, jc.clone()).unwrap();
    let (_, end) = walk(&pager).await;
    let e = end.unwrap();
    assert_eq!(*e.kind(), ErrorKind::Pagination, "{e}");
    assert!(e.to_string().contains("page 2"), "{e}");
    // A page() call returns all its items or fails as a whole.
    assert!(pager.page(None, 10).await.is_err());

    let site = Site::new(|_| {
        (
            200,
            vec![],
            json!({"data": ["x".repeat(5000)], "next": null}).to_string(),
        )
    });
    let pager = Paginate::builder(site.service(), BASE, jc)
        .with_max_page_bytes(1000)
        .build()
        .unwrap();
    let (_, end) = walk(&pager).await;
    assert_eq!(*end.unwrap().kind(), ErrorKind::Body);
}

#[test]
fn page_debug_hides_the_next_links_query_and_userinfo() {
    let p = Page {
        number: 1,
        items: vec![],
        next: Some("https://robot:pa55@api.example.com/v1/items?token=qs3cret".into()),
    };
    let dbg = format!("{p:?}");
    assert!(!dbg.contains("qs3cret") && !dbg.contains("pa55"), "{dbg}");
}

#[test]
fn pagers_and_streams_can_go_to_other_tasks() {
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}
    send_sync_clone::<Paginate<JsonCursor>>();
    send_sync_clone::<Paginate<LinkHeader>>();
    send::<sturdy::paginate::PageStream<Value>>();
    send::<sturdy::paginate::BoundedPage>();
}

#[tokio::test(start_paused = true)]
async fn no_query_secret_or_userinfo_of_a_page_uri_in_errors_or_logs() {
    let logs = crate::s43_util::Logs::default();
    let _guard = logs.capture();
    let secret_next = "https://robot:pa55@api.example.com/v1/items?page=2&api_key=qs3cret";
    // (what page 2 does, the kind expected)
    let cases: [(&str, ErrorKind); 4] = [
        (
            "503",
            ErrorKind::Server(http::StatusCode::SERVICE_UNAVAILABLE),
        ),
        ("json", ErrorKind::Pagination),
        ("big", ErrorKind::Body),
        ("stall", ErrorKind::Timeout),
    ];
    for (mode, kind) in cases {
        let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
            let first = req.uri().query().is_none();
            async move {
                if first {
                    return Ok::<_, Infallible>(
                        Response::builder()
                            .header("link", format!("<{secret_next}>; rel=\"next\""))
                            .body(Full::<Bytes>::from("[1]"))
                            .unwrap(),
                    );
                }
                let (status, body) = match mode {
                    "503" => (503, "busy".to_owned()),
                    "json" => (200, "{not json".to_owned()),
                    "big" => (200, format!("[\"{}\"]", "x".repeat(4_000))),
                    _ => {
                        tokio::time::sleep(Duration::from_secs(3_600)).await;
                        (200, "[]".to_owned())
                    }
                };
                Ok(Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::from(body))
                    .unwrap())
            }
        });
        let pager = Paginate::builder(svc, BASE, LinkHeader::new("").without_limit_param())
            .with_max_page_bytes(1_000)
            .with_page_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let (pages, end) = walk(&pager).await;
        assert_eq!(pages.len(), 1, "{mode}");
        let e = end.unwrap_or_else(|| panic!("{mode}: no error"));
        assert_eq!(
            std::mem::discriminant(e.kind()),
            std::mem::discriminant(&kind),
            "{mode}: {e}"
        );
        let text = crate::s43_util::chain(&e);
        assert!(
            !text.contains("qs3cret") && !text.contains("pa55"),
            "{mode}: {text}"
        );
        assert!(!format!("{:?}", pages[0]).contains("qs3cret"));
    }
    let text = logs.text();
    assert!(
        !text.contains("qs3cret") && !text.contains("pa55"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_next_link_back_to_the_first_page_in_another_case_is_a_loop() {
    for back in [
        "HTTPS://API.EXAMPLE.COM/v1/items",
        "https://Api.Example.Com/v1/items",
    ] {
        let site = Site::new(move |_| {
            (
                200,
                vec![("link", format!("<{back}>; rel=\"next\""))],
                "[1]".into(),
            )
        });
        let pager = Paginate::new(site.service(), BASE, LinkHeader::new("")).unwrap();
        let (pages, end) = walk(&pager).await;
        assert_eq!(
            items_of(&pages),
            [json!(1)],
            "{back}: an item was yielded twice"
        );
        assert!(
            end.is_some_and(|e| e.to_string().contains("loop")),
            "{back}"
        );
        assert_eq!(site.asked().len(), 1, "{back}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_next_link_back_to_the_first_page_with_its_default_port_is_a_loop() {
    let back = "https://api.example.com:443/v1/items";
    let site = Site::new(move |_| {
        (
            200,
            vec![("link", format!("<{back}>; rel=\"next\""))],
            "[1]".into(),
        )
    });
    let pager = Paginate::new(site.service(), BASE, LinkHeader::new("")).unwrap();
    let (pages, _) = walk(&pager).await;
    assert_eq!(items_of(&pages), [json!(1)], "an item was yielded twice");
    assert_eq!(site.asked().len(), 1);
}
