//! Outside tests of sturdy-paginate against docs/guides/paginate.md, docs/guides/agents.md and the
//! rustdoc of `sturdy_paginate`: Link headers as RFC 8288 writes them (several fields, commas
//! inside the target or a quoted parameter, relative references of every form, explicit default
//! ports, case), enormous headers, loops under two spellings, and bounded pages for agents.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{Request, Response};
use http_body_util::Full;
use serde_json::{json, Value};
use sturdy::core::ErrorKind;
use sturdy::paginate::{JsonCursor, LinkHeader, Paginate};
use tower::service_fn;

type Hits = Arc<Mutex<Vec<String>>>;

/// A Link-header API: `pages(uri)` gives the items and the `Link` field values of the page at
/// `uri` (path and query).
fn link_api(
    hits: Hits,
    pages: impl Fn(&str) -> (Value, Vec<String>) + Send + Sync + Clone + 'static,
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
        let hits = hits.clone();
        let pages = pages.clone();
        async move {
            hits.lock().unwrap().push(req.uri().to_string());
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default();
            let (items, links) = pages(&pq);
            let mut res = Response::builder();
            for l in links {
                res = res.header("link", l);
            }
            Ok::<_, Infallible>(res.body(Full::from(items.to_string())).unwrap())
        }
    })
}

async fn walk(pager: &Paginate<LinkHeader>) -> (Vec<Value>, Option<sturdy::core::Error>) {
    let mut s = pager.items();
    let mut items = Vec::new();
    loop {
        match s.try_next().await {
            Ok(Some(v)) => items.push(v),
            Ok(None) => return (items, None),
            Err(e) => return (items, Some(e)),
        }
    }
}

fn one(s: &str) -> Vec<String> {
    vec![s.to_owned()]
}

/// RFC 8288 §3 and RFC 9110 §5.3: a response may carry several `Link` fields, which mean the same
/// as one field with the values joined by commas. GitHub sends one field; others (and proxies)
/// split them. The next link in the second field is followed.
#[tokio::test]
async fn a_next_link_in_a_second_link_field_is_followed() {
    let hits: Hits = Arc::default();
    let api = link_api(hits.clone(), |pq| match pq {
        "/a" => (
            json!([1]),
            vec![
                r#"<http://api.example.com/a>; rel="first""#.to_owned(),
                r#"<http://api.example.com/b>; rel="next""#.to_owned(),
            ],
        ),
        _ => (json!([2]), vec![]),
    });
    let pager = Paginate::builder(api, "http://api.example.com/a", LinkHeader::new(""))
        .build()
        .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        items,
        vec![json!(1), json!(2)],
        "the walk ended early: {:?}",
        hits.lock().unwrap()
    );
}

/// RFC 8288: the target is between `<` and `>` and may contain commas; a quoted parameter may
/// contain commas and semicolons. Neither splits the link.
#[tokio::test]
async fn commas_inside_the_target_or_a_quoted_parameter_do_not_split_a_link() {
    for link in [
        r#"<http://api.example.com/b?ids=1,2,3>; rel="next""#,
        r#"<http://api.example.com/b?ids=1,2,3>; title="one, two; three"; rel="next""#,
        r#"<http://api.example.com/z>; rel="prev"; title="a, <http://api.example.com/q>; rel=next", <http://api.example.com/b?ids=1,2,3>; rel="next""#,
    ] {
        let hits: Hits = Arc::default();
        let owned = link.to_owned();
        let api = link_api(hits.clone(), move |pq| {
            if pq == "/a" {
                (json!([1]), one(&owned))
            } else {
                (json!([2]), vec![])
            }
        });
        let pager = Paginate::builder(api, "http://api.example.com/a", LinkHeader::new(""))
            .build()
            .unwrap();
        let (items, err) = walk(&pager).await;
        let hits = hits.lock().unwrap().clone();
        assert!(err.is_none(), "{link}: {err:?} {hits:?}");
        assert_eq!(items, vec![json!(1), json!(2)], "{link}: {hits:?}");
        assert_eq!(
            hits[1], "http://api.example.com/b?ids=1,2,3",
            "{link}: {hits:?}"
        );
    }
}

/// "relative links resolved" (RFC 3986 §5): a query-only reference, a dot segment, an absolute
/// path, a parent segment.
#[tokio::test]
async fn relative_references_of_every_form_are_resolved_against_the_page() {
    let cases = [
        (
            "<?page=2>; rel=next",
            "http://api.example.com/v1/items?page=2",
        ),
        (
            "<./items?page=2>; rel=next",
            "http://api.example.com/v1/items?page=2",
        ),
        (
            "<../v2/items?page=2>; rel=next",
            "http://api.example.com/v2/items?page=2",
        ),
        (
            "</v1/items?page=2>; rel=next",
            "http://api.example.com/v1/items?page=2",
        ),
        (
            "<items?page=2>; rel=next",
            "http://api.example.com/v1/items?page=2",
        ),
    ];
    for (link, expect) in cases {
        let hits: Hits = Arc::default();
        let owned = link.to_owned();
        let api = link_api(hits.clone(), move |pq| {
            if pq == "/v1/items?page=1" {
                (json!([1]), one(&owned))
            } else {
                (json!([2]), vec![])
            }
        });
        let pager = Paginate::builder(
            api,
            "http://api.example.com/v1/items?page=1",
            LinkHeader::new("").without_limit_param(),
        )
        .build()
        .unwrap();
        let (items, err) = walk(&pager).await;
        let hits = hits.lock().unwrap().clone();
        assert!(err.is_none(), "{link}: {err:?} {hits:?}");
        assert_eq!(items.len(), 2, "{link}: {hits:?}");
        assert_eq!(hits[1], expect, "{link}");
    }
}

/// The same origin spelled differently is not foreign: an upper-case scheme or host (RFC 3986:
/// case-insensitive) or the scheme's default port written out.
#[tokio::test]
async fn the_same_origin_spelled_differently_is_not_foreign() {
    let mut refused = Vec::new();
    for link in [
        "<HTTP://API.EXAMPLE.COM/b>; rel=next",
        "<http://API.example.com/b>; rel=next",
        "<HTTP://api.example.com/b>; rel=next",
        "<http://api.example.com:80/b>; rel=next",
    ] {
        let hits: Hits = Arc::default();
        let owned = link.to_owned();
        let api = link_api(hits.clone(), move |pq| {
            if pq == "/a" {
                (json!([1]), one(&owned))
            } else {
                (json!([2]), vec![])
            }
        });
        let pager = Paginate::builder(api, "http://api.example.com/a", LinkHeader::new(""))
            .build()
            .unwrap();
        let (items, err) = walk(&pager).await;
        if let Some(e) = err {
            refused.push(format!("{link}: {e}"));
        } else {
            assert_eq!(items.len(), 2, "{link}");
        }
    }
    assert!(
        refused.is_empty(),
        "refused as foreign:\n{}",
        refused.join("\n")
    );
}

/// A loop whose link spells the first page's host in upper case: pages are known "by the URI
/// they are fetched from" with "scheme and host compared without case", so it is a loop.
#[tokio::test]
async fn a_loop_through_an_upper_case_host_is_a_loop() {
    let hits: Hits = Arc::default();
    let api = link_api(hits.clone(), |pq| match pq {
        "/a" => (json!([1]), one("</b>; rel=next")),
        _ => (json!([2]), one("<HTTP://API.EXAMPLE.COM/a>; rel=next")),
    });
    let pager = Paginate::builder(api, "http://api.example.com/a", LinkHeader::new(""))
        .with_max_pages(50)
        .build()
        .unwrap();
    let (items, err) = walk(&pager).await;
    let err = err.expect("a loop error");
    eprintln!("upper-case loop: {err}");
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    assert!(
        err.to_string().contains("loop"),
        "not reported as a loop: {err}"
    );
    assert_eq!(items, vec![json!(1), json!(2)], "{err}");
    assert_eq!(hits.lock().unwrap().len(), 2);
}

/// An enormous Link header (1 MiB; 20,000 links, the next one last) costs little CPU.
#[tokio::test]
async fn an_enormous_link_header_is_read_quickly() {
    let mut big = String::new();
    for i in 0..20_000 {
        big.push_str(&format!(
            "<http://api.example.com/x{i}?{}>; rel=\"item\", ",
            "p".repeat(30)
        ));
    }
    big.push_str("<http://api.example.com/b>; rel=\"next\"");
    assert!(big.len() > 1_000_000);
    let hits: Hits = Arc::default();
    let api = link_api(hits.clone(), move |pq| {
        if pq == "/a" {
            (json!([1]), vec![big.clone()])
        } else {
            (json!([2]), vec![])
        }
    });
    let pager = Paginate::builder(api, "http://api.example.com/a", LinkHeader::new(""))
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let (items, err) = walk(&pager).await;
    let took = start.elapsed();
    eprintln!(
        "1 MiB Link header: {took:?}, {} items, {err:?}",
        items.len()
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
}

/// Thousands of `Link` fields on one response.
#[tokio::test]
async fn thousands_of_link_fields_are_read_quickly() {
    let hits: Hits = Arc::default();
    let api = link_api(hits.clone(), move |pq| {
        if pq == "/a" {
            let mut v: Vec<String> = (0..5_000)
                .map(|i| format!("<http://api.example.com/x{i}>; rel=\"item\""))
                .collect();
            v.push("<http://api.example.com/b>; rel=\"next\"".to_owned());
            (json!([1]), v)
        } else {
            (json!([2]), vec![])
        }
    });
    let pager = Paginate::builder(api, "http://api.example.com/a", LinkHeader::new(""))
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let (items, err) = walk(&pager).await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    eprintln!("5,000 Link fields: {took:?}, items {items:?}, {err:?}");
}

/// A page that lists its items as links too (as Linked Data Platform containers and some HAL
/// APIs do): 150 `rel="item"` links, then `rel="next"`. The walk follows the next link, or, if
/// it bounds how many links it reads, ends with an error that says so ("Each guard ends a walk
/// ... with an error that says what happened"). It never ends quietly as if the last page had
/// been reached.
#[tokio::test]
async fn a_next_link_after_many_item_links_is_not_dropped_silently() {
    for split in [false, true] {
        let api = link_api(Arc::default(), move |pq| {
            if pq == "/a" {
                let mut v: Vec<String> = (0..150)
                    .map(|i| format!("<http://api.example.com/items/{i}>; rel=\"item\""))
                    .collect();
                v.push("<http://api.example.com/b>; rel=\"next\"".to_owned());
                let fields = if split { v } else { vec![v.join(", ")] };
                (json!([1]), fields)
            } else {
                (json!([2]), vec![])
            }
        });
        let pager = Paginate::builder(api, "http://api.example.com/a", LinkHeader::new(""))
            .build()
            .unwrap();
        let (items, err) = walk(&pager).await;
        assert!(
            items.len() == 2 || err.is_some(),
            "split {split}: the walk ended quietly after {items:?}: the second page was never fetched"
        );
    }
}

/// A JSON-cursor API of `n` items, `per` per page at most whatever is asked (a server cap).
fn capped_cursor_api(
    n: usize,
    per: usize,
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
    service_fn(move |req: Request<Full<Bytes>>| {
        let hits = hits.clone();
        async move {
            hits.lock().unwrap().push(req.uri().to_string());
            let q = req.uri().query().unwrap_or("");
            let start: usize = q
                .split('&')
                .find_map(|kv| kv.strip_prefix("cursor="))
                .map_or(0, |c| c.parse().unwrap());
            let end = (start + per).min(n);
            let next = if end < n {
                json!(end.to_string())
            } else {
                Value::Null
            };
            let body = json!({ "data": (start..end).collect::<Vec<_>>(), "next": next });
            Ok::<_, Infallible>(Response::new(Full::from(body.to_string())))
        }
    })
}

/// agents.md: `BoundedPage { items, has_more, next_cursor }` "serialises as is"; a limit of 0
/// reads as 1; the last page says `has_more: false` and has no cursor; the walk over bounded pages
/// returns every item exactly once, in order, across server pages of another size.
#[tokio::test]
async fn bounded_pages_cover_every_item_once_and_serialise_as_is() {
    let hits: Hits = Arc::default();
    let api = capped_cursor_api(23, 5, hits.clone());
    let pager = Paginate::new(
        api,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let p = pager.page(None, 0).await.unwrap();
    assert_eq!(p.items, vec![json!(0)]);
    assert!(p.has_more);
    let v = serde_json::to_value(&p).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 3, "{v}");
    assert!(v.get("items").is_some() && v.get("has_more").is_some());
    assert!(v.get("next_cursor").is_some(), "{v}");
    let mut all = p.items.clone();
    let mut cursor = p.next_cursor.clone();
    let mut calls = 0;
    while let Some(c) = cursor.take() {
        let p = pager.page(Some(&c), 3).await.unwrap();
        assert!(p.items.len() <= 3);
        all.extend(p.items.clone());
        if !p.has_more {
            assert!(p.next_cursor.is_none(), "no more, yet a cursor");
        }
        cursor = p.next_cursor;
        calls += 1;
        assert!(calls < 50);
    }
    assert_eq!(all, (0..23).map(|i| json!(i)).collect::<Vec<_>>());
}

/// "a `page()` call that needs more than `max_pages` pages fails", as a whole.
#[tokio::test]
async fn a_bounded_page_needing_more_than_max_pages_fails_as_a_whole() {
    let hits: Hits = Arc::default();
    let api = capped_cursor_api(100, 1, hits.clone());
    let pager = Paginate::builder(
        api,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_pages(3)
    .build()
    .unwrap();
    let err = pager.page(None, 10).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    assert!(
        hits.lock().unwrap().len() <= 3,
        "{:?}",
        hits.lock().unwrap()
    );
    eprintln!("max_pages in page(): {err}");
}

/// A bounded page over Link headers: a foreign next link fails the call as a whole, and a
/// link back to the page the cursor came from is refused.
#[tokio::test]
async fn bounded_pages_over_link_headers_guard_origin_and_loops() {
    let hits: Hits = Arc::default();
    let api = link_api(hits.clone(), |pq| match pq {
        "/a" => (json!([1, 2]), one("<http://evil.example.net/b>; rel=next")),
        _ => (json!([3]), vec![]),
    });
    let pager = Paginate::builder(
        api,
        "http://api.example.com/a",
        LinkHeader::new("").without_limit_param(),
    )
    .build()
    .unwrap();
    // Two items fit in the first page: the foreign link is only a cursor.
    let r = pager.page(None, 2).await;
    match r {
        Ok(p) => {
            assert_eq!(p.items, vec![json!(1), json!(2)]);
            if let Some(c) = p.next_cursor {
                let err = pager.page(Some(&c), 2).await.unwrap_err();
                assert_eq!(err.kind(), &ErrorKind::Pagination);
            }
        }
        Err(e) => assert_eq!(e.kind(), &ErrorKind::Pagination),
    }
    let err = pager.page(None, 3).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    assert!(!hits.lock().unwrap().iter().any(|u| u.contains("evil")));

    // A page linking to itself.
    let hits: Hits = Arc::default();
    let api = link_api(hits.clone(), |_| {
        (json!([1, 2]), one("<http://api.example.com/a>; rel=next"))
    });
    let pager = Paginate::builder(
        api,
        "http://api.example.com/a",
        LinkHeader::new("").without_limit_param(),
    )
    .build()
    .unwrap();
    let r = pager.page(None, 5).await;
    let err = r.expect_err("a page whose next link is itself");
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    assert!(hits.lock().unwrap().len() <= 2);
}

/// RFC 8288 §3: `link-param = token BWS [ "=" BWS ( token / quoted-string ) ]`, so whitespace
/// around `=` is allowed; a target may carry a fragment (not sent in a request); a network-path
/// reference to the same host is the same origin.
#[tokio::test]
async fn valid_link_spellings_are_followed() {
    let mut failures = Vec::new();
    for link in [
        "</b>; rel = next",
        "</b> ; rel=\"next\"",
        "</b>;rel=next",
        "</b#section>; rel=next",
        "<//api.example.com/b>; rel=next",
        "</b>; REL=next",
    ] {
        let hits: Hits = Arc::default();
        let owned = link.to_owned();
        let api = link_api(hits.clone(), move |pq| {
            if pq == "/a" {
                (json!([1]), one(&owned))
            } else {
                (json!([2]), vec![])
            }
        });
        let pager = Paginate::builder(api, "http://api.example.com/a", LinkHeader::new(""))
            .build()
            .unwrap();
        let (items, err) = walk(&pager).await;
        let hits = hits.lock().unwrap().clone();
        if items.len() != 2
            || err.is_some()
            || hits.get(1).map(String::as_str) != Some("http://api.example.com/b")
        {
            failures.push(format!(
                "{link}: items {items:?}, error {err:?}, requests {hits:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
