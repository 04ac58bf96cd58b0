//! No item is yielded twice by a loop, and `page()` accepts only the cursors it handed out.

use crate::support;
use base64::Engine as _;
use futures_util::TryStreamExt;
use serde_json::{json, Value};
use sturdy_core::{Error, ErrorKind};
use sturdy_paginate::{JsonCursor, LinkHeader, OffsetLimit, PageNumber, Paginate};
use support::{api, page};

/// Collects a walk's items up to its end or its error.
async fn walk<P: sturdy_paginate::PageStrategy>(
    pager: &Paginate<P>,
) -> (Vec<Value>, Option<Error>) {
    let mut got = Vec::new();
    let mut s = pager.items();
    loop {
        match s.try_next().await {
            Ok(Some(v)) => got.push(v),
            Ok(None) => return (got, None),
            Err(e) => return (got, Some(e)),
        }
    }
}

#[tokio::test]
async fn a_next_link_back_to_the_first_page_ends_the_walk_before_its_items_repeat() {
    let (svc, count) = api(|pq| match pq {
        "/x" => page("[1,2]", Some("</x?page=2>; rel=\"next\"")),
        "/x?page=2" => page("[3]", Some("</x>; rel=\"next\"")),
        _ => page("[]", None),
    });
    let pager = Paginate::new(svc, "http://api.example.com/x", LinkHeader::new("")).unwrap();
    let (items, e) = walk(&pager).await;
    assert_eq!(items, [json!(1), json!(2), json!(3)]);
    let e = e.expect("the loop was not caught");
    assert_eq!(e.kind(), &ErrorKind::Pagination);
    assert_eq!(
        e.to_string(),
        "pagination loop: the next cursor of page 2 (\"http://api.example.com/x\") leads back to /x, a page already read"
    );
    assert_eq!(count.get(), 2, "the first page was not fetched again");
}

#[tokio::test]
async fn a_page_that_links_to_itself_is_yielded_once() {
    let (svc, count) = api(|pq| match pq {
        "/x" => page(r#"{"data":[1],"next":"s"}"#, None),
        _ => page(r#"{"data":[2],"next":"s"}"#, None),
    });
    let pager = Paginate::new(
        svc,
        "http://api.example.com/x",
        JsonCursor::new("/data", "/next").without_limit_param(),
    )
    .unwrap();
    let (items, e) = walk(&pager).await;
    assert_eq!(items, [json!(1), json!(2)]);
    assert!(e
        .unwrap()
        .to_string()
        .contains("leads back to the same page"));
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn bounded_pages_refuse_a_cursor_that_would_fetch_the_page_it_came_from() {
    // Page "s" links to itself: the old behaviour returned its items and the same cursor forever.
    let (svc, count) = api(|pq| {
        if pq.contains("cursor=s") {
            page(r#"{"data":[3,4],"next":"s"}"#, None)
        } else {
            page(r#"{"data":[1,2],"next":"s"}"#, None)
        }
    });
    let pager = Paginate::new(
        svc,
        "http://api.example.com/x",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let first = pager.page(None, 2).await.unwrap();
    assert_eq!(first.items, [json!(1), json!(2)]);
    let second = pager.page(first.next_cursor.as_deref(), 2).await.unwrap();
    assert_eq!(second.items, [json!(3), json!(4)]);
    assert!(second.has_more);
    assert_eq!(count.get(), 2);
    let e = pager
        .page(second.next_cursor.as_deref(), 2)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Pagination);
    assert!(
        e.to_string().starts_with(
            "pagination loop: this cursor would fetch /x again, the page it came from"
        ),
        "{e}"
    );
    assert_eq!(count.get(), 2, "refused before any request");

    // Within one call, the repeated page is not fetched, whatever the limit.
    let e = pager
        .page(first.next_cursor.as_deref(), 10)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("the page it came from"), "{e}");
    assert_eq!(count.get(), 3);
}

#[tokio::test]
async fn bounded_pages_catch_a_longer_loop_within_a_call() {
    let (svc, count) = api(|pq| {
        if pq.contains("cursor=a") {
            page(r#"{"data":[2],"next":"b"}"#, None)
        } else if pq.contains("cursor=b") {
            page(r#"{"data":[3],"next":"a"}"#, None)
        } else {
            page(r#"{"data":[1],"next":"a"}"#, None)
        }
    });
    let pager = Paginate::new(
        svc,
        "http://api.example.com/x",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let e = pager.page(None, 10).await.unwrap_err();
    assert!(
        e.to_string()
            .starts_with("pagination loop: the next cursor \"a\" leads back to /x"),
        "{e}"
    );
    assert_eq!(count.get(), 3);
}

#[tokio::test]
async fn bounded_pages_over_endless_empty_pages_stop_at_max_pages() {
    // Every page is empty and names a new cursor. Without a bound, one call would never return;
    // after 1,000 requests this script ends, so the test fails instead of hanging.
    let (svc, count) = api(|pq| {
        let n: usize = pq
            .split("cursor=")
            .nth(1)
            .and_then(|c| c.split('&').next())
            .map_or(0, |c| c.parse().unwrap());
        if n >= 1_000 {
            page(r#"{"data":[],"next":null}"#, None)
        } else {
            page(&format!(r#"{{"data":[],"next":"{}"}}"#, n + 1), None)
        }
    });
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/x",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_pages(5)
    .build()
    .unwrap();
    let e = pager.page(None, 10).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Pagination);
    assert!(
        e.to_string()
            .starts_with("stopped after 5 pages (max_pages)"),
        "{e}"
    );
    assert_eq!(count.get(), 5);
}

fn link_pages() -> (
    impl tower::Service<
            http::Request<http_body_util::Full<bytes::Bytes>>,
            Response = http::Response<http_body_util::Full<bytes::Bytes>>,
            Error = std::convert::Infallible,
            Future = impl std::future::Future<
                Output = Result<
                    http::Response<http_body_util::Full<bytes::Bytes>>,
                    std::convert::Infallible,
                >,
            > + Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    support::Count,
) {
    api(|pq| {
        if pq.starts_with("/x?page=2") {
            page("[3,4]", None)
        } else {
            page("[1,2]", Some("</x?page=2>; rel=\"next\""))
        }
    })
}

#[tokio::test]
async fn a_forged_or_edited_cursor_is_refused_before_any_request() {
    let (svc, count) = link_pages();
    let pager = Paginate::new(svc, "http://api.example.com/x", LinkHeader::new("")).unwrap();
    // What an unsigned cursor looked like: same origin, any path, fetched with the pager's
    // credentials.
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(r#"{"c":"http://api.example.com/admin/export","s":0,"l":10}"#);
    let e = pager.page(Some(&forged), 10).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Pagination);
    assert!(
        e.to_string()
            .contains("is not a cursor this pager returned (unknown, edited, or from another pager or endpoint); start again without a cursor"),
        "{e}"
    );
    assert_eq!(count.get(), 0);

    // A real cursor, one character changed; and cut short.
    let first = pager.page(None, 2).await.unwrap();
    let good = first.next_cursor.unwrap();
    assert_eq!(count.get(), 1);
    for i in [0, good.len() / 2, good.len() - 1] {
        let mut b = good.clone().into_bytes();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        let edited = String::from_utf8(b).unwrap();
        assert!(pager.page(Some(&edited), 2).await.is_err(), "edited at {i}");
    }
    assert!(pager.page(Some(&good[..good.len() - 4]), 2).await.is_err());
    assert!(pager
        .page(Some(&"A".repeat(sturdy_paginate::MAX_CURSOR_LEN + 4)), 2)
        .await
        .is_err());
    assert_eq!(count.get(), 1, "no refused cursor was fetched");
    // The real one still works.
    let next = pager.page(Some(&good), 2).await.unwrap();
    assert_eq!(next.items, [json!(3), json!(4)]);
}

#[tokio::test]
async fn cursors_are_bound_to_their_pager_unless_a_key_is_shared() {
    let (svc, count) = link_pages();
    let a = Paginate::new(svc.clone(), "http://api.example.com/x", LinkHeader::new("")).unwrap();
    let b = Paginate::new(svc.clone(), "http://api.example.com/x", LinkHeader::new("")).unwrap();
    let cursor = a.page(None, 2).await.unwrap().next_cursor.unwrap();
    assert!(
        b.page(Some(&cursor), 2).await.is_err(),
        "each pager has its own random key"
    );
    assert!(
        a.clone().page(Some(&cursor), 2).await.is_ok(),
        "clones share it"
    );

    // A shared key: a cursor survives a restart (a new pager with the same key)...
    let key = [7u8; 32];
    let before = Paginate::builder(svc.clone(), "http://api.example.com/x", LinkHeader::new(""))
        .with_cursor_key(key)
        .build()
        .unwrap();
    let cursor = before.page(None, 2).await.unwrap().next_cursor.unwrap();
    let after = Paginate::builder(svc.clone(), "http://api.example.com/x", LinkHeader::new(""))
        .with_cursor_key(key)
        .build()
        .unwrap();
    assert_eq!(
        after.page(Some(&cursor), 2).await.unwrap().items,
        [json!(3), json!(4)]
    );
    // ...but is still refused by a pager of another endpoint.
    let other = Paginate::builder(svc, "http://api.example.com/y", LinkHeader::new(""))
        .with_cursor_key(key)
        .build()
        .unwrap();
    let n = count.get();
    assert!(other.page(Some(&cursor), 2).await.is_err());
    assert_eq!(count.get(), n);
}

#[test]
fn configuration_mistakes_are_reported_when_the_pager_is_built() {
    fn refused<P: sturdy_paginate::PageStrategy>(b: sturdy_paginate::PaginateBuilder<P>) -> String {
        let Err(e) = b.build() else {
            panic!("built");
        };
        assert_eq!(e.kind(), &ErrorKind::Config);
        e.to_string()
    }
    let (svc, _) = api(|_| page("[]", None));
    let url = "http://api.example.com/x";
    let b = || Paginate::builder(svc.clone(), url, JsonCursor::new("/data", "/next"));
    assert!(refused(b().with_max_pages(0)).contains("with_max_pages(0)"));
    assert!(refused(b().with_max_items(0)).contains("with_max_items(0)"));
    assert!(refused(b().with_page_size(0)).contains("with_page_size(0)"));
    assert!(refused(b().with_max_page_bytes(0)).contains("with_max_page_bytes(0)"));
    assert!(
        refused(b().with_page_timeout(std::time::Duration::ZERO)).contains("with_page_timeout(0)")
    );
    assert!(refused(b().with_cursor_key([1u8; 16])).contains("at least 32 random bytes"));
    assert!(refused(Paginate::builder(
        svc.clone(),
        "/relative",
        JsonCursor::new("/data", "/next")
    ))
    .contains("must be absolute"));
    assert!(refused(Paginate::builder(
        svc.clone(),
        url,
        JsonCursor::new("data", "/next")
    ))
    .contains("the items pointer \"data\" is not a JSON pointer"));
    assert!(refused(Paginate::builder(
        svc.clone(),
        url,
        JsonCursor::new("/data", "/next").with_cursor_param("")
    ))
    .contains("the cursor query parameter name is empty"));
    assert!(refused(Paginate::builder(
        svc.clone(),
        url,
        PageNumber::new("/items").with_page_size(0)
    ))
    .contains("page size must be at least 1"));
    assert!(refused(Paginate::builder(
        svc.clone(),
        url,
        OffsetLimit::new("/items").with_params("n", "n")
    ))
    .contains("both \"n\""));
    assert!(refused(Paginate::builder(
        svc.clone(),
        url,
        LinkHeader::new("/items").with_limit_param("")
    ))
    .contains("limit query parameter name is empty"));
    // The key never shows in Debug output.
    let dbg = format!("{:?}", b().with_cursor_key([7u8; 32]));
    assert!(dbg.contains("[redacted]") && !dbg.contains("7, 7"), "{dbg}");
}

#[tokio::test]
async fn walks_of_every_strategy_still_end_normally() {
    let (svc, _) = api(|pq| {
        if pq.contains("?page=2") || pq.contains("offset=2") {
            page(r#"{"items":[3]}"#, None)
        } else {
            page(r#"{"items":[1,2]}"#, None)
        }
    });
    let url = "http://api.example.com/x";
    let pages = Paginate::new(
        svc.clone(),
        url,
        PageNumber::new("/items").with_page_size(2),
    )
    .unwrap();
    let (items, e) = walk(&pages).await;
    assert_eq!(items, [json!(1), json!(2), json!(3)]);
    assert!(e.is_none());
    let offsets = Paginate::new(svc, url, OffsetLimit::new("/items").with_page_size(2)).unwrap();
    assert_eq!(walk(&offsets).await.0.len(), 3);
}
