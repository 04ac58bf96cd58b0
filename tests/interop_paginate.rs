//! Interop: `Paginate` with `LinkHeader` against json-server 0.17 (npm), started by
//! `scripts/interop.sh` with 100 items at `/items` (ids 1 to 100).
//!
//! json-server paginates when asked `_page` (1-based) and `_limit`, and answers
//! `Link: <...>; rel="first", <...>; rel="prev", <...>; rel="next", <...>; rel="last"` with
//! absolute URLs; the last page has no `next`.
use crate::interop_common;
use std::time::Duration;

use futures_util::TryStreamExt;
use interop_common::*;
use serde::Deserialize;
use sturdy::core::ErrorKind;
use sturdy::paginate::{LinkHeader, Paginate};
use sturdy::ClientBuilder;

const JSON_SERVER: &str = "STURDY_INTEROP_JSON_SERVER_URL";

#[derive(Debug, Deserialize, PartialEq)]
struct Item {
    id: u64,
    name: String,
}

fn strategy() -> LinkHeader {
    LinkHeader::new("").with_limit_param("_limit")
}

fn ids(items: &[serde_json::Value]) -> Vec<u64> {
    items.iter().map(|v| v["id"].as_u64().unwrap()).collect()
}

/// The item stream over Link headers: all 100 items, once each, in order, one request per
/// server page.
#[tokio::test]
async fn walk_collects_every_item_once_in_order() {
    let base = peer_or_skip!(JSON_SERVER);
    let (wire_svc, wire) = recorded(http());
    let client = ClientBuilder::new().build(wire_svc);
    let pager = Paginate::builder(client, &format!("{base}/items?_page=1"), strategy())
        .with_page_size(10)
        .with_page_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let items: Vec<Item> = bounded(
        Duration::from_secs(20),
        "walk",
        pager.items_as::<Item>().try_collect(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<u64> = items.iter().map(|i| i.id).collect();
    assert_eq!(got, (1..=100).collect::<Vec<_>>());
    assert_eq!(items[41].name, "item-42");
    let uris: Vec<String> = wire.all().iter().map(|e| e.uri.clone()).collect();
    assert_eq!(uris.len(), 10, "one request per page: {uris:?}");
    assert_eq!(uris[0], format!("{base}/items?_page=1&_limit=10"));
    assert_eq!(uris[9], format!("{base}/items?_page=10&_limit=10"));
}

/// The page stream: 10 pages numbered 1 to 10, the last without a next cursor.
#[tokio::test]
async fn page_stream_numbers_and_ends() {
    let base = peer_or_skip!(JSON_SERVER);
    let pager = Paginate::builder(http(), &format!("{base}/items?_page=1"), strategy())
        .with_page_size(25)
        .build()
        .unwrap();
    let pages: Vec<_> = bounded(
        Duration::from_secs(20),
        "pages",
        pager.pages().try_collect(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pages.len(), 4);
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(p.number, i + 1);
        assert_eq!(p.items.len(), 25);
    }
    assert!(pages[3].next.is_none());
    assert_eq!(
        pages[0].next.as_deref(),
        Some(format!("{base}/items?_page=2&_limit=25").as_str())
    );
}

/// Bounded pages for an agent: `page(cursor, 7)` walks all 100 items, 7 at a time, resuming
/// exactly after the last item returned; `has_more` is false only at the end.
#[tokio::test]
async fn bounded_pages_walk_everything_with_cursors() {
    let base = peer_or_skip!(JSON_SERVER);
    let (wire_svc, wire) = recorded(http());
    let pager = Paginate::new(wire_svc, &format!("{base}/items?_page=1"), strategy()).unwrap();
    let mut cursor: Option<String> = None;
    let mut all = Vec::new();
    let mut calls = 0;
    loop {
        calls += 1;
        assert!(calls <= 20, "too many calls");
        let page = bounded(
            Duration::from_secs(10),
            "page()",
            pager.page(cursor.as_deref(), 7),
        )
        .await
        .unwrap_or_else(|e| panic!("call {calls}: {e}"));
        assert!(page.items.len() <= 7, "{}", page.items.len());
        all.extend(ids(&page.items));
        if !page.has_more {
            assert!(page.next_cursor.is_none());
            break;
        }
        cursor = page.next_cursor;
        assert!(cursor.is_some(), "has_more comes with a cursor");
    }
    assert_eq!(all, (1..=100).collect::<Vec<_>>());
    assert_eq!(calls, 15, "100 items, 7 per call");
    // Server pages of 7 (`min(limit, 100)`): each fetched once.
    assert_eq!(
        wire.len(),
        15,
        "{:?}",
        wire.all().iter().map(|e| &e.uri).collect::<Vec<_>>()
    );
    assert!(wire.all()[0].uri.ends_with("_page=1&_limit=7"));
}

/// Tool pages smaller than the server's pages: the cursor resumes inside a server page.
#[tokio::test]
async fn bounded_pages_resume_inside_server_pages() {
    let base = peer_or_skip!(JSON_SERVER);
    let pager = Paginate::builder(http(), &format!("{base}/items?_page=1"), strategy())
        .with_page_size(30)
        .build()
        .unwrap();
    let mut cursor: Option<String> = None;
    let mut all = Vec::new();
    for _ in 0..20 {
        let page = bounded(
            Duration::from_secs(10),
            "page()",
            pager.page(cursor.as_deref(), 8),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(page.items.len() <= 8);
        all.extend(ids(&page.items));
        if !page.has_more {
            break;
        }
        cursor = page.next_cursor;
    }
    assert_eq!(all, (1..=100).collect::<Vec<_>>());
}

/// A cursor edited by the caller is refused before any request.
#[tokio::test]
async fn edited_cursor_is_refused() {
    let base = peer_or_skip!(JSON_SERVER);
    let (wire_svc, wire) = recorded(http());
    let pager = Paginate::new(wire_svc, &format!("{base}/items?_page=1"), strategy()).unwrap();
    let page = pager.page(None, 10).await.unwrap();
    let sent = wire.len();
    let mut cursor = page.next_cursor.unwrap();
    let last = cursor.pop().unwrap();
    cursor.push(if last == 'A' { 'B' } else { 'A' });
    let err = pager.page(Some(&cursor), 10).await.unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::Pagination, "{err}");
    assert_eq!(wire.len(), sent, "nothing sent for a forged cursor");
}

/// The bounds: `max_items` ends a walk with an error after the items before it; `max_pages`
/// likewise after its pages.
#[tokio::test]
async fn walk_bounds_hold() {
    let base = peer_or_skip!(JSON_SERVER);
    let pager = Paginate::builder(http(), &format!("{base}/items?_page=1"), strategy())
        .with_page_size(10)
        .with_max_items(35)
        .build()
        .unwrap();
    let mut items = pager.items();
    let mut got = Vec::new();
    let err = bounded(Duration::from_secs(10), "bounded walk", async {
        loop {
            match items.try_next().await {
                Ok(Some(v)) => got.push(v["id"].as_u64().unwrap()),
                Ok(None) => panic!("the walk ended without the bound's error"),
                Err(e) => break e,
            }
        }
    })
    .await;
    assert_eq!(*err.kind(), ErrorKind::Pagination, "{err}");
    assert_eq!(got, (1..=35).collect::<Vec<_>>());

    let pager = Paginate::builder(http(), &format!("{base}/items?_page=1"), strategy())
        .with_page_size(10)
        .with_max_pages(3)
        .build()
        .unwrap();
    let mut pages = pager.pages();
    let mut n = 0;
    let err = bounded(Duration::from_secs(10), "page-bounded walk", async {
        loop {
            match pages.try_next().await {
                Ok(Some(_)) => n += 1,
                Ok(None) => panic!("the walk ended without the bound's error"),
                Err(e) => break e,
            }
        }
    })
    .await;
    assert_eq!(n, 3);
    assert_eq!(*err.kind(), ErrorKind::Pagination, "{err}");
}

/// Bounded pages with seeded limits (1 to 15 items each) read every item once, in order: a
/// page's cursor can end inside a server page and the next call resumes there.
#[tokio::test]
async fn bounded_pages_with_seeded_limits_read_everything_once() {
    let base = peer_or_skip!(JSON_SERVER);
    let pager = Paginate::builder(http(), &format!("{base}/items?_page=1"), strategy())
        .with_page_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for seed in [3u64, 63] {
        // A seeded xorshift: the limits are the same on every run.
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut got = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..200 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let limit = 1 + (state % 15) as usize;
            let page = bounded(
                Duration::from_secs(10),
                "bounded page",
                pager.page(cursor.as_deref(), limit),
            )
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            got.extend(ids(&page.items));
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(got, (1..=100).collect::<Vec<u64>>(), "seed {seed}");
    }
}

/// A filtered walk keeps its filter through the next links; a second pager with the same
/// cursor key and another page size resumes the first one's cursor exactly; a version header
/// added by `ClientBuilder` changes nothing.
#[tokio::test]
async fn filtered_walk_and_a_twin_pager_resuming_its_cursor() {
    use sturdy::version::VersionLayer;
    const KEY: &[u8] = b"interop-shared-cursor-key-0123456789";
    let base = peer_or_skip!(JSON_SERVER);
    let client = ClientBuilder::new()
        .with_version(VersionLayer::header("api-version", "2024-06-01").unwrap())
        .build(http());
    let uri = format!("{base}/items?id_gte=41&id_lte=90&_page=1");
    let want: Vec<u64> = (41..=90).collect();
    let a = Paginate::builder(client.clone(), &uri, strategy())
        .with_page_size(4)
        .with_cursor_key(KEY)
        .build()
        .unwrap();
    let all: Vec<serde_json::Value> = bounded(
        Duration::from_secs(20),
        "filtered walk",
        a.items().try_collect(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ids(&all), want);
    let b = Paginate::builder(client, &uri, strategy())
        .with_page_size(6)
        .with_cursor_key(KEY)
        .build()
        .unwrap();
    let first = bounded(Duration::from_secs(10), "first page", a.page(None, 5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut got = ids(&first.items);
    let mut cursor = first.next_cursor;
    for _ in 0..50 {
        let Some(c) = cursor.take() else { break };
        let page = bounded(Duration::from_secs(10), "twin page", b.page(Some(&c), 3))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        got.extend(ids(&page.items));
        cursor = page.next_cursor;
    }
    assert_eq!(got, want);
}
