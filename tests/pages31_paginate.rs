//! `sturdy-paginate` for an agent-tool builder, against small hyper servers on 127.0.0.1:0 that
//! send hostile Link headers and cursors: endless walks, empty pages, loops, other hosts,
//! thousands of links, a page that fails mid-walk, bodies at the byte limit, and the futures
//! dropped at every await. Every sentence checked is quoted from docs/guides/paginate.md or the
//! crate docs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use std::future::Future;

use futures_util::{StreamExt, TryStreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use sturdy::core::ErrorKind;
use sturdy::paginate::{BoundedPage, JsonCursor, LinkHeader, PageStream, Paginate};

use crate::pages31_util::*;

fn ids(items: &[Value]) -> Vec<u64> {
    items.iter().map(|v| v["id"].as_u64().unwrap()).collect()
}

fn kind(e: &sturdy::core::Error) -> ErrorKind {
    e.kind().clone()
}

/// A Link-paginated API: `total` items (ids from 1), `?page=` from 1, `?per_page=` honoured
/// (else `per`); the body is the array itself.
async fn link_api(total: usize, per: usize) -> Server {
    serve(move |req, _| async move {
        let page: usize = param(&req, "page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        let size: usize = param(&req, "per_page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(per)
            .max(1);
        let start = (page - 1) * size;
        let end = (start + size).min(total);
        let items: Vec<Value> = (start.min(total)..end)
            .map(|i| json!({"id": i + 1}))
            .collect();
        let mut headers = Vec::new();
        if end < total {
            headers.push((
                "link",
                format!("</items?page={}&per_page={size}>; rel=\"next\"", page + 1),
            ));
        }
        json_response(Value::Array(items), &headers)
    })
    .await
}

fn link_pager(server: &Server) -> sturdy::paginate::PaginateBuilder<LinkHeader> {
    Paginate::builder(http(), &server.url("/items"), LinkHeader::new(""))
        .with_page_timeout(Duration::from_secs(10))
}

/// "More than `max_pages` pages ... ends a walk with an error after the items before the
/// bound": a JSON cursor that never ends is cut at `max_pages` requests, by the walks and by a
/// `page()` call, and the stream says nothing more after its error.
#[tokio::test]
async fn pages31_an_endless_cursor_is_cut_at_max_pages() {
    let server = serve(|req, _| async move {
        let n: u64 = param(&req, "cursor")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        json_response(
            json!({"data": [{"id": 2 * n + 1}, {"id": 2 * n + 2}], "next": (n + 1).to_string()}),
            &[],
        )
    })
    .await;
    let pager = Paginate::builder(
        http(),
        &server.url("/items"),
        JsonCursor::new("/data", "/next"),
    )
    .with_max_pages(5)
    .build()
    .unwrap();
    let mut stream = pager.items();
    let mut got = Vec::new();
    let err = loop {
        match within(Duration::from_secs(10), "walk", stream.next()).await {
            Some(Ok(v)) => got.push(v["id"].as_u64().unwrap()),
            Some(Err(e)) => break e,
            None => panic!("an endless cursor ended without an error"),
        }
    };
    assert_eq!(got, (1..=10).collect::<Vec<_>>());
    assert_eq!(kind(&err), ErrorKind::Pagination, "{err}");
    assert_eq!(server.seen.count(), 5, "{:?}", server.seen.hits());
    assert!(
        within(Duration::from_secs(5), "after", stream.next())
            .await
            .is_none(),
        "the stream goes on after its error"
    );
    assert_eq!(server.seen.count(), 5, "a request after the error");

    let err = within(Duration::from_secs(10), "page", pager.page(None, 1000))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Pagination, "{err}");
    assert!(
        server.seen.count() <= 10,
        "a page() call read more than max_pages pages: {}",
        server.seen.count() - 5
    );
}

/// Empty pages that still link to a next page: the walk and `page()` go through them to the
/// items, and an endless run of empty pages ends at `max_pages` instead of hanging.
#[tokio::test]
async fn pages31_empty_pages_with_next_links() {
    let server = serve(|req, _| async move {
        let page: usize = param(&req, "page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        let items = if page == 4 {
            json!([{"id": 1}, {"id": 2}, {"id": 3}])
        } else {
            json!([])
        };
        let mut headers = Vec::new();
        if page < 4 {
            headers.push(("link", format!("<?page={}>; rel=\"next\"", page + 1)));
        }
        json_response(items, &headers)
    })
    .await;
    let pager = link_pager(&server).build().unwrap();
    let all: Vec<Value> = within(
        Duration::from_secs(10),
        "walk",
        pager.items().try_collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert_eq!(ids(&all), [1, 2, 3]);

    let first = within(Duration::from_secs(10), "page", pager.page(None, 2))
        .await
        .unwrap();
    assert_eq!((ids(&first.items), first.has_more), (vec![1, 2], true));
    let rest = within(
        Duration::from_secs(10),
        "page 2",
        pager.page(first.next_cursor.as_deref(), 2),
    )
    .await
    .unwrap();
    assert_eq!((ids(&rest.items), rest.has_more), (vec![3], false));
    assert_eq!(rest.next_cursor, None);

    let endless = serve(|req, _| async move {
        let page: usize = param(&req, "page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        json_response(
            json!([]),
            &[("link", format!("<?page={}>; rel=\"next\"", page + 1))],
        )
    })
    .await;
    let pager = link_pager(&endless).with_max_pages(4).build().unwrap();
    let err = within(Duration::from_secs(10), "page", pager.page(None, 5))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Pagination, "{err}");
    assert!(endless.seen.count() <= 4, "{:?}", endless.seen.hits());
    let err = within(
        Duration::from_secs(10),
        "walk",
        pager.items().try_collect::<Vec<_>>(),
    )
    .await
    .unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Pagination, "{err}");
}

/// "a guard or a failed page ends it with an error", "a page that answered an error status
/// fails with the kind of that status", and "A `page()` call returns all its items or fails as
/// a whole".
#[tokio::test]
async fn pages31_a_page_failing_mid_walk_ends_the_walk() {
    let server = serve(|req, _| async move {
        let page: usize = param(&req, "page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        if page == 3 {
            return status(502);
        }
        json_response(
            json!([{"id": 2 * page - 1}, {"id": 2 * page}]),
            &[("link", format!("<?page={}>; rel=\"next\"", page + 1))],
        )
    })
    .await;
    let pager = link_pager(&server).build().unwrap();
    let mut stream = pager.items();
    let mut got = Vec::new();
    let err = loop {
        match within(Duration::from_secs(10), "walk", stream.next()).await {
            Some(Ok(v)) => got.push(v["id"].as_u64().unwrap()),
            Some(Err(e)) => break e,
            None => panic!("ended without the error"),
        }
    };
    assert_eq!(got, [1, 2, 3, 4]);
    assert_eq!(
        kind(&err),
        ErrorKind::Server(http::StatusCode::BAD_GATEWAY),
        "{err}"
    );
    assert!(err.to_string().contains("page 3"), "{err}");
    assert!(stream.next().await.is_none());
    assert_eq!(server.seen.count(), 3);

    // A page() call that needs page 3 fails as a whole.
    let err = pager.page(None, 6).await.unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Server(http::StatusCode::BAD_GATEWAY));
    // One that needs only pages 1 and 2 is whole.
    let ok = pager.page(None, 4).await.unwrap();
    assert_eq!(ids(&ok.items), [1, 2, 3, 4]);
    assert!(ok.has_more);
}

/// A body that breaks off mid-page (the connection fails after some bytes) ends the walk with
/// an error, and a later walk starts afresh.
#[tokio::test]
async fn pages31_a_body_cut_mid_page_ends_the_walk() {
    let server = serve(|req, _| async move {
        let page: usize = param(&req, "page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        if page == 2 {
            return Response::builder()
                .status(200)
                .header("link", "<?page=3>; rel=\"next\"")
                .body(chunked(
                    vec![Bytes::from_static(b"[{\"id\": 3}, {\"id\"")],
                    true,
                ))
                .unwrap();
        }
        let mut headers = Vec::new();
        if page < 3 {
            headers.push(("link", format!("<?page={}>; rel=\"next\"", page + 1)));
        }
        json_response(json!([{"id": 2 * page - 1}, {"id": 2 * page}]), &headers)
    })
    .await;
    let pager = link_pager(&server).build().unwrap();
    let mut stream = pager.items();
    let mut got = Vec::new();
    let err = loop {
        match within(Duration::from_secs(10), "walk", stream.next()).await {
            Some(Ok(v)) => got.push(v["id"].as_u64().unwrap()),
            Some(Err(e)) => break e,
            None => panic!("a cut body ended the walk without an error"),
        }
    };
    assert_eq!(got, [1, 2]);
    assert!(stream.next().await.is_none());
    assert!(err.to_string().contains("page 2"), "{err}");
    assert_eq!(server.seen.count(), 2, "{:?}", server.seen.hits());
    let err = pager.page(None, 3).await.unwrap_err();
    assert!(!err.to_string().is_empty());
}

/// "More than ... `max_items` items ends a walk with an error after the items before the
/// bound": exactly `max_items` items is no error; one more is.
#[tokio::test]
async fn pages31_max_items_bound_exact_and_past() {
    let exact = link_api(7, 5).await;
    let pager = link_pager(&exact).with_max_items(7).build().unwrap();
    let all: Vec<Value> = within(
        Duration::from_secs(10),
        "walk",
        pager.items().try_collect::<Vec<_>>(),
    )
    .await
    .unwrap_or_else(|e| panic!("7 items under a bound of 7: {e}"));
    assert_eq!(all.len(), 7);

    let past = link_api(10, 5).await;
    let pager = link_pager(&past).with_max_items(7).build().unwrap();
    let mut stream = pager.items();
    let mut got = Vec::new();
    let err = loop {
        match within(Duration::from_secs(10), "walk", stream.next()).await {
            Some(Ok(v)) => got.push(v["id"].as_u64().unwrap()),
            Some(Err(e)) => break e,
            None => panic!("10 items under a bound of 7 ended without an error: {got:?}"),
        }
    };
    assert_eq!(got, (1..=7).collect::<Vec<_>>());
    assert_eq!(kind(&err), ErrorKind::Pagination, "{err}");

    // The page stream honours the same bound: no more than 7 items in the pages it yields.
    let mut pages = pager.pages();
    let mut count = 0;
    let mut ended_with_error = false;
    while let Some(p) = within(Duration::from_secs(10), "pages", pages.next()).await {
        match p {
            Ok(p) => count += p.items.len(),
            Err(e) => {
                assert_eq!(kind(&e), ErrorKind::Pagination, "{e}");
                ended_with_error = true;
                break;
            }
        }
    }
    assert!(
        ended_with_error,
        "the page stream passed max_items silently"
    );
    assert!(
        count <= 7,
        "the page stream yielded {count} items past a bound of 7"
    );

    // page(): "one above `with_max_items` as that bound".
    let p = pager.page(None, 1_000_000).await.unwrap();
    assert_eq!(p.items.len(), 7);
    assert!(p.has_more);
}

/// "More than `max_pages` pages": exactly `max_pages` pages is a whole walk.
#[tokio::test]
async fn pages31_max_pages_exact_is_not_an_error() {
    let server = link_api(20, 5).await;
    let pager = link_pager(&server).with_max_pages(4).build().unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 20);
    let page = pager.page(None, 20).await.unwrap();
    assert_eq!(page.items.len(), 20);
    assert!(!page.has_more);
    let server = link_api(21, 5).await;
    let pager = link_pager(&server).with_max_pages(4).build().unwrap();
    let err = pager.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Pagination);
}

/// "A body larger than the page limit fails with kind `Body`": a body of exactly the limit is
/// read, one byte more is refused.
#[tokio::test]
async fn pages31_page_byte_limit_edges() {
    let body = json!([{"id": 1}, {"id": 2}]).to_string();
    let n = body.len();
    let b = body.clone();
    let server = serve(move |_, _| {
        let b = b.clone();
        async move { Response::builder().status(200).body(full(b)).unwrap() }
    })
    .await;
    let ok = link_pager(&server).with_max_page_bytes(n).build().unwrap();
    let all: Vec<Value> = ok.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 2);
    let short = link_pager(&server)
        .with_max_page_bytes(n - 1)
        .build()
        .unwrap();
    let err = short.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Body, "{err}");
    let err = short.page(None, 5).await.unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Body, "{err}");

    // Chunked, no length: the same edge.
    let b = body.clone();
    let chunks = serve(move |_, _| {
        let b = b.clone();
        async move {
            let parts: Vec<Bytes> = b.as_bytes().chunks(3).map(Bytes::copy_from_slice).collect();
            let stream = futures_util::stream::iter(
                parts
                    .into_iter()
                    .map(|c| Ok::<_, std::io::Error>(Frame::data(c))),
            );
            Response::builder()
                .status(200)
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap()
        }
    })
    .await;
    let ok = link_pager(&chunks).with_max_page_bytes(n).build().unwrap();
    assert_eq!(ok.items().try_collect::<Vec<_>>().await.unwrap().len(), 2);
    let short = link_pager(&chunks)
        .with_max_page_bytes(n - 1)
        .build()
        .unwrap();
    let err = short.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Body, "{err}");
}

/// Loops through absolute and relative spellings of pages already fetched (the first page's
/// included): each item once, then a loop error, and the looping URI is not fetched again.
#[tokio::test]
async fn pages31_loops_through_absolute_and_relative_links() {
    let server = serve(|req, _| async move {
        let host = req.headers()["host"].to_str().unwrap().to_owned();
        let page: usize = param(&req, "page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        let next = match page {
            1 => format!("<http://{host}/items?page=2>; rel=\"next\""),
            2 => "<items?page=3>; rel=\"next\"".to_owned(),
            // Back to page 2, relative to the path.
            _ => "<./items?page=2>; rel=\"next\"".to_owned(),
        };
        json_response(
            json!([{"id": 2 * page - 1}, {"id": 2 * page}]),
            &[("link", next)],
        )
    })
    .await;
    let pager = link_pager(&server).build().unwrap();
    let mut stream = pager.items();
    let mut got = Vec::new();
    let err = loop {
        match within(Duration::from_secs(10), "walk", stream.next()).await {
            Some(Ok(v)) => got.push(v["id"].as_u64().unwrap()),
            Some(Err(e)) => break e,
            None => panic!("a loop ended silently"),
        }
    };
    assert_eq!(got, [1, 2, 3, 4, 5, 6]);
    assert_eq!(kind(&err), ErrorKind::Pagination);
    assert!(err.to_string().to_lowercase().contains("loop"), "{err}");
    assert_eq!(
        server.seen.hits(),
        ["/items", "/items?page=2", "/items?page=3"]
    );

    // A self link on the first page: the page is yielded, then the loop error.
    let selfish = serve(|_, _| async move {
        json_response(
            json!([{"id": 1}]),
            &[("link", "</items>; rel=\"next\"".into())],
        )
    })
    .await;
    let pager = link_pager(&selfish).build().unwrap();
    let mut stream = pager.items();
    assert_eq!(stream.next().await.unwrap().unwrap()["id"], 1);
    let err = stream.next().await.unwrap().unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Pagination);
    assert!(stream.next().await.is_none());
    assert_eq!(selfish.seen.count(), 1);
    // page(): the whole page, and no cursor that would fetch it again.
    let p = pager.page(None, 10).await;
    let shown = format!("{p:?}");
    match p {
        Ok(p) => {
            assert_eq!(ids(&p.items), [1]);
            if let Some(c) = p.next_cursor.as_deref() {
                let err = pager.page(Some(c), 10).await.unwrap_err();
                assert_eq!(kind(&err), ErrorKind::Pagination);
            }
        }
        Err(e) => assert_eq!(kind(&e), ErrorKind::Pagination),
    }
    // page() asks for `?per_page=10`, a URI other than the self link `/items`: "The same page
    // reached under two different URIs ... is not recognised as a loop", so `/items` is read too.
    assert!(
        selfish.seen.count() <= 3,
        "{:?} {}",
        selfish.seen.hits(),
        shown
    );
}

/// "A next link to another origin is refused unless `.with_foreign_origin_allowed(true)`":
/// another port, another name for the same host, a userinfo trick and other schemes are all
/// refused before any request reaches them; allowed, the other port is followed.
#[tokio::test]
async fn pages31_foreign_next_links_are_refused_before_a_request() {
    let other = link_api(2, 5).await;
    let other_url = other.url("/items");
    let port = other.addr.port();
    let targets = [
        other_url.clone(),
        format!("http://localhost:{port}/items"),
        format!("http://127.0.0.1:{port}@127.0.0.2:{port}/items"),
        format!("//127.0.0.1:{port}/items"),
        "file:///etc/passwd".to_owned(),
        "javascript:alert(1)".to_owned(),
        "https://127.0.0.1/items".to_owned(),
    ];
    for target in targets {
        let t = target.clone();
        let first = serve(move |_, _| {
            let t = t.clone();
            async move {
                json_response(
                    json!([{"id": 1}]),
                    &[("link", format!("<{t}>; rel=\"next\""))],
                )
            }
        })
        .await;
        let pager = link_pager(&first)
            .with_header(
                http::HeaderName::from_static("authorization"),
                http::HeaderValue::from_static("Bearer pages31-secret"),
            )
            .build()
            .unwrap();
        let res: Result<Vec<Value>, _> =
            within(Duration::from_secs(10), "walk", pager.items().try_collect()).await;
        let err = res.expect_err(&format!("followed a foreign link to {target}"));
        assert_eq!(kind(&err), ErrorKind::Pagination, "{target}: {err}");
        assert!(!format!("{err} {err:?}").contains("pages31-secret"));
        let err = pager.page(None, 5).await.unwrap_err();
        assert_eq!(kind(&err), ErrorKind::Pagination, "{target}: {err}");
    }
    assert_eq!(other.seen.count(), 0, "{:?}", other.seen.hits());

    let o = other_url.clone();
    let first = serve(move |_, _| {
        let o = o.clone();
        async move {
            json_response(
                json!([{"id": 0}]),
                &[("link", format!("<{o}>; rel=\"next\""))],
            )
        }
    })
    .await;
    let pager = link_pager(&first)
        .with_foreign_origin_allowed(true)
        .build()
        .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(ids(&all), [0, 1, 2]);
}

/// Thousands of links in one huge Link header, the next one last: read, followed, and quickly.
#[tokio::test]
async fn pages31_thousands_of_links_in_a_huge_header() {
    let server = serve(|req, _| async move {
        let page: usize = param(&req, "page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        let mut link = String::new();
        for i in 0..5000 {
            link.push_str(&format!(
                "</items/{i}?x=\"a,b\">; rel=\"item\"; title=\"t;{i}\", "
            ));
        }
        if page < 3 {
            link.push_str(&format!("</items?page={}>; rel=\"next\"", page + 1));
        } else {
            link.push_str("</items?page=1>; rel=\"first\"");
        }
        json_response(json!([{"id": page}]), &[("link", link)])
    })
    .await;
    let pager = link_pager(&server).build().unwrap();
    let started = tokio::time::Instant::now();
    let all: Vec<Value> = within(
        Duration::from_secs(20),
        "walk",
        pager.items().try_collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert_eq!(ids(&all), [1, 2, 3]);
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A server cursor that doubles in length on every page: the walk is bounded by
/// `max_pages`; `page()` never hands out a cursor past `MAX_CURSOR_LEN`, and says so.
#[tokio::test]
async fn pages31_a_server_cursor_that_grows_without_end() {
    let server = serve(|req, _| async move {
        let c = param(&req, "cursor").unwrap_or_else(|| "a".into());
        let next = format!("{c}{c}");
        json_response(json!({"data": [{"id": c.len()}], "next": next}), &[])
    })
    .await;
    let pager = Paginate::builder(
        http(),
        &server.url("/items"),
        JsonCursor::new("/data", "/next").without_limit_param(),
    )
    .with_max_pages(12)
    .build()
    .unwrap();
    let err = within(
        Duration::from_secs(20),
        "walk",
        pager.items().try_collect::<Vec<_>>(),
    )
    .await
    .unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Pagination, "{err}");
    let mut cursor: Option<String> = None;
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps < 40, "no end");
        match within(
            Duration::from_secs(10),
            "page",
            pager.page(cursor.as_deref(), 1),
        )
        .await
        {
            Ok(p) => {
                if let Some(c) = &p.next_cursor {
                    assert!(c.len() <= sturdy::paginate::MAX_CURSOR_LEN);
                }
                match p.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => panic!("has_more {} without a cursor", p.has_more),
                }
            }
            Err(e) => {
                assert_eq!(kind(&e), ErrorKind::Pagination, "{e}");
                assert!(e.to_string().contains("cursor"), "{e}");
                break;
            }
        }
    }
}

/// "returns at most `limit` items ... fetching no page that was not needed": the number of
/// requests each call makes.
#[tokio::test]
async fn pages31_page_fetches_only_the_pages_it_needs() {
    // The server ignores the page size asked for: 7 per page, 21 items.
    let server = serve(|req, _| async move {
        let page: usize = param(&req, "page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        let items: Vec<Value> = ((page - 1) * 7..page * 7)
            .map(|i| json!({"id": i + 1}))
            .collect();
        let mut headers = Vec::new();
        if page < 3 {
            headers.push(("link", format!("</items?page={}>; rel=\"next\"", page + 1)));
        }
        json_response(Value::Array(items), &headers)
    })
    .await;
    let pager = link_pager(&server).build().unwrap();
    let a = pager.page(None, 7).await.unwrap();
    assert_eq!((a.items.len(), a.has_more), (7, true));
    assert_eq!(server.seen.count(), 1, "{:?}", server.seen.hits());
    let b = pager.page(a.next_cursor.as_deref(), 3).await.unwrap();
    assert_eq!(ids(&b.items), [8, 9, 10]);
    assert_eq!(server.seen.count(), 2);
    let c = pager.page(b.next_cursor.as_deref(), 11).await.unwrap();
    assert_eq!(ids(&c.items), (11..=21).collect::<Vec<_>>());
    assert!(!c.has_more, "the last item of the last page: has_more");
    assert_eq!(c.next_cursor, None);
    // Page 2 again (resumed inside it) and page 3; nothing past the end.
    assert_eq!(server.seen.count(), 4, "{:?}", server.seen.hits());
}

/// "Cheap to clone: clones share the configuration and the cursor key": 16 tasks walk the same
/// API with `page()` on clones of one pager, with cursors handed between them, and every task
/// sees every item once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages31_many_tasks_page_through_clones_with_shared_cursors() {
    let server = link_api(230, 25).await;
    let pager = link_pager(&server).build().unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let pager = pager.clone();
        let peer = pager.clone();
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ t;
            let mut cursor: Option<String> = None;
            let mut got = Vec::new();
            for step in 0.. {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let limit = 1 + (seed >> 33) as usize % 60;
                // Odd steps go through the other clone.
                let p = if step % 2 == 0 { &pager } else { &peer };
                let page: BoundedPage = p.page(cursor.as_deref(), limit).await.unwrap();
                assert!(page.items.len() <= limit);
                got.extend(ids(&page.items));
                if !page.has_more {
                    assert_eq!(page.next_cursor, None);
                    break;
                }
                cursor = page.next_cursor;
            }
            got
        }));
    }
    for t in tasks {
        let got = within(Duration::from_secs(60), "task", t).await.unwrap();
        assert_eq!(got, (1..=230).collect::<Vec<_>>());
    }
}

/// What an agent tool shares: `Paginate` is `Send + Sync + Clone`, its streams are `Send`, a
/// `BoundedPage` is plain data.
#[test]
fn pages31_shared_types_are_send_sync_clone() {
    fn send_sync_clone<T: Send + Sync + Clone + 'static>() {}
    fn send<T: Send + 'static>() {}
    send_sync_clone::<Paginate<LinkHeader>>();
    send_sync_clone::<Paginate<JsonCursor>>();
    send_sync_clone::<BoundedPage>();
    send::<PageStream<Value>>();
    send::<PageStream<sturdy::paginate::Page>>();
}

/// The futures dropped at every await: a walk or a `page()` call polled k times and dropped
/// holds no request future and no body afterwards, and yields only a prefix of the items; a
/// later call is whole.
#[tokio::test]
async fn pages31_dropped_at_every_await_holds_nothing() {
    #[derive(Clone)]
    struct Live(Arc<AtomicUsize>);
    struct Held(Arc<AtomicUsize>);
    impl Live {
        fn hold(&self) -> Held {
            self.0.fetch_add(1, Ordering::SeqCst);
            Held(self.0.clone())
        }
        fn now(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }
    impl Drop for Held {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let live = Live(Arc::new(AtomicUsize::new(0)));
    let l = live.clone();
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let l = l.clone();
        async move {
            let held = l.hold();
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            let q = req.uri().query().unwrap_or("").to_owned();
            let page: usize = q
                .split('&')
                .find_map(|kv| kv.strip_prefix("page="))
                .and_then(|p| p.parse().ok())
                .unwrap_or(1);
            let items: Vec<Value> = ((page - 1) * 4..page * 4)
                .map(|i| json!({"id": i + 1}))
                .collect();
            let body = Value::Array(items).to_string().into_bytes();
            let chunks: Vec<Bytes> = body.chunks(5).map(Bytes::copy_from_slice).collect();
            drop(held);
            let in_body = l.hold();
            let stream = futures_util::stream::iter(chunks).then(move |c| {
                let _keep = &in_body;
                async move {
                    tokio::task::yield_now().await;
                    Ok::<_, std::io::Error>(Frame::data(c))
                }
            });
            let mut res = Response::builder();
            if page < 3 {
                res = res.header("link", format!("<?page={}>; rel=\"next\"", page + 1));
            }
            Ok::<_, std::convert::Infallible>(res.body(StreamBody::new(stream)).unwrap())
        }
    });
    let pager = Paginate::builder(api, "http://api.example.com/items", LinkHeader::new(""))
        .build()
        .unwrap();
    let whole: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(ids(&whole), (1..=12).collect::<Vec<_>>());
    assert_eq!(live.now(), 0);
    let whole_page = pager.page(None, 6).await.unwrap();
    let mut completed_walk = false;
    for k in 0..400 {
        let mut s = pager.items();
        let mut got = Vec::new();
        let mut done = false;
        for _ in 0..k {
            match std::future::poll_fn(|cx| Poll::Ready(s.poll_next_unpin(cx))).await {
                Poll::Ready(Some(Ok(v))) => got.push(v),
                Poll::Ready(Some(Err(e))) => panic!("{e}"),
                Poll::Ready(None) => {
                    done = true;
                    break;
                }
                Poll::Pending => {}
            }
        }
        drop(s);
        assert_eq!(
            live.now(),
            0,
            "a dropped walk still holds something (k = {k})"
        );
        assert_eq!(ids(&got), ids(&whole[..got.len()]));
        if done {
            completed_walk = true;
            break;
        }
    }
    assert!(completed_walk);
    let mut completed_page = false;
    for k in 0..400 {
        let mut fut = Box::pin(pager.page(whole_page.next_cursor.as_deref(), 5));
        let mut out = None;
        for _ in 0..k {
            if let Poll::Ready(r) =
                std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
            {
                out = Some(r);
                break;
            }
        }
        drop(fut);
        assert_eq!(
            live.now(),
            0,
            "a dropped page() call still holds something (k = {k})"
        );
        if let Some(r) = out {
            assert_eq!(ids(&r.unwrap().items), [7, 8, 9, 10, 11]);
            completed_page = true;
            break;
        }
    }
    assert!(completed_page);
}

/// A next link with a fragment (`RFC 3986` allows one in a URI reference; it is never sent):
/// the walk follows it as the page without the fragment.
#[tokio::test]
async fn pages31_a_next_link_with_a_fragment_is_followed() {
    let server = serve(|req, _| async move {
        let page: usize = param(&req, "page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        let mut headers = Vec::new();
        if page < 2 {
            headers.push(("link", "</items?page=2#section>; rel=\"next\"".to_owned()));
        }
        json_response(json!([{"id": page}]), &headers)
    })
    .await;
    let pager = link_pager(&server).build().unwrap();
    let all: Result<Vec<Value>, _> = pager.items().try_collect().await;
    assert_eq!(ids(&all.unwrap()), [1, 2]);
}

/// "the timeout covers the response head and the whole body, so a server that sends the head
/// and then stalls the body cannot hang a walk": a body that drips one byte at a time inside
/// the byte limit ends at the page timeout, with kind `Timeout`, in a walk and a `page()`.
#[tokio::test]
async fn pages31_a_dripping_body_ends_at_the_page_timeout() {
    let server = serve(|_, _| async move {
        let stream = futures_util::stream::unfold(0u64, |i| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some((
                Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b" "))),
                i + 1,
            ))
        });
        Response::builder()
            .status(200)
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap()
    })
    .await;
    let pager = Paginate::builder(http(), &server.url("/items"), LinkHeader::new(""))
        .with_page_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = within(
        Duration::from_secs(10),
        "walk",
        pager.items().try_collect::<Vec<_>>(),
    )
    .await
    .unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Timeout, "{err}");
    let err = within(Duration::from_secs(10), "page", pager.page(None, 3))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Timeout, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
