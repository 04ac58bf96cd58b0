//! Walks against the chaos server's 8,000 orders (with faults), and every guard.

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{Request, Response};
use http_body_util::Full;
use serde::Deserialize;
use sturdy_chaos::{http_client, ChaosServer, Knobs};
use sturdy_core::ErrorKind;
use sturdy_paginate::{JsonCursor, LinkHeader, OffsetLimit, PageNumber, PageStrategy, Paginate};
use sturdy_retry::{Backoff, RetryLayer};
use tower::{service_fn, Layer};

const ORDERS: usize = 8_000;

async fn server(error_rate: f64) -> ChaosServer {
    ChaosServer::start(Knobs {
        orders: ORDERS,
        error_rate,
        seed: 99,
        ..Knobs::default()
    })
    .await
    .unwrap()
}

fn stack() -> sturdy_retry::Retry<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
> {
    let backoff =
        Backoff::decorrelated_jitter(Duration::from_millis(1), Duration::from_millis(10)).unwrap();
    RetryLayer::new()
        .with_backoff(backoff)
        .with_max_attempts(10)
        .without_budget()
        .with_seed(5)
        .layer(http_client())
}

async fn walk_all<P: PageStrategy>(s: &ChaosServer, path: &str, strategy: P) -> Vec<String> {
    let pager = Paginate::builder(stack(), &s.url(path), strategy)
        .with_page_size(100)
        .build()
        .unwrap();
    let items: Vec<serde_json::Value> = pager.items().try_collect().await.unwrap();
    items
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_owned())
        .collect()
}

fn assert_every_order_once(ids: &[String]) {
    assert_eq!(ids.len(), ORDERS);
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ORDERS);
    assert_eq!(ids[0], "o_1");
    assert_eq!(ids[ORDERS - 1], format!("o_{ORDERS}"));
}

#[tokio::test]
async fn every_strategy_walks_all_8000_orders_once_through_5xx_faults() {
    let s = server(0.1).await;
    assert_every_order_once(
        &walk_all(&s, "/orders", JsonCursor::new("/data", "/next_cursor")).await,
    );
    assert_every_order_once(&walk_all(&s, "/orders/link", LinkHeader::new("")).await);
    assert_every_order_once(
        &walk_all(
            &s,
            "/orders/pages",
            PageNumber::new("/items").with_total("/total"),
        )
        .await,
    );
    assert_every_order_once(
        &walk_all(
            &s,
            "/orders/offset",
            OffsetLimit::new("/items").with_total("/total"),
        )
        .await,
    );
    // Short-page stop, without a total.
    assert_every_order_once(&walk_all(&s, "/orders/pages", PageNumber::new("/items")).await);
    assert!(
        s.stats().server_errors > 10,
        "faults were injected: {:?}",
        s.stats()
    );
}

#[tokio::test]
async fn items_deserialize_into_the_callers_type() {
    #[derive(Deserialize)]
    struct Order {
        id: String,
        amount: u64,
    }
    let s = server(0.0).await;
    let pager = Paginate::builder(
        stack(),
        &s.url("/orders"),
        JsonCursor::new("/data", "/next_cursor"),
    )
    .with_page_size(100)
    .build()
    .unwrap();
    let orders: Vec<Order> = pager.items_as::<Order>().try_collect().await.unwrap();
    assert_eq!(orders.len(), ORDERS);
    assert_eq!((orders[41].id.as_str(), orders[41].amount), ("o_42", 42));
}

#[tokio::test]
async fn bounded_pages_for_an_agent_fetch_only_what_is_asked() {
    let s = server(0.05).await;
    let pager = Paginate::new(
        stack(),
        &s.url("/orders"),
        JsonCursor::new("/data", "/next_cursor"),
    )
    .unwrap();
    let first = pager.page(None, 20).await.unwrap();
    assert_eq!(first.items.len(), 20);
    assert!(first.has_more);
    assert_eq!(s.stats().page_requests, 1);
    let mut cursor = first.next_cursor;
    let mut seen = 20;
    let mut calls = 1;
    while let Some(c) = cursor {
        let p = pager.page(Some(&c), 20).await.unwrap();
        seen += p.items.len();
        calls += 1;
        assert_eq!(p.has_more, p.next_cursor.is_some());
        cursor = p.next_cursor;
    }
    assert_eq!(calls, 400);
    assert_eq!(seen, ORDERS);
    assert_eq!(
        s.stats().page_requests,
        400,
        "no page was fetched that was not asked for"
    );
}

#[tokio::test]
async fn bounded_pages_resume_inside_a_page_and_across_strategies() {
    let s = server(0.0).await;
    // Link pagination: the cursor carries the next URL; a limit smaller than the page resumes
    // inside it.
    let pager = Paginate::builder(stack(), &s.url("/orders/link"), LinkHeader::new(""))
        .with_page_size(50)
        .build()
        .unwrap();
    let a = pager.page(None, 30).await.unwrap();
    let b = pager.page(a.next_cursor.as_deref(), 30).await.unwrap();
    let ids: Vec<&str> = a
        .items
        .iter()
        .chain(b.items.iter())
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 60);
    assert_eq!(ids[29], "o_30");
    assert_eq!(ids[30], "o_31");
    assert_eq!(ids[59], "o_60");
    // Page numbers.
    let pager = Paginate::new(
        stack(),
        &s.url("/orders/pages"),
        PageNumber::new("/items").with_total("/total"),
    )
    .unwrap();
    let p = pager.page(None, 7_995).await.unwrap();
    let rest = pager.page(p.next_cursor.as_deref(), 100).await.unwrap();
    assert_eq!(rest.items.len(), 5);
    assert!(!rest.has_more);
    // A cursor from nowhere.
    let e = pager.page(Some("not-a-cursor"), 10).await.unwrap_err();
    assert!(
        e.to_string().contains("start again without a cursor"),
        "{e}"
    );
}

/// An in-process API whose pages the test scripts.
fn scripted(
    pages: Vec<(String, Option<String>, String)>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    // (query to match, Link header, body)
    service_fn(move |req: Request<Full<Bytes>>| {
        let q = req.uri().query().unwrap_or("").to_owned();
        let found = pages
            .iter()
            .find(|(m, _, _)| q.contains(m.as_str()))
            .or_else(|| pages.first())
            .cloned();
        async move {
            let (_, link, body) = found.unwrap();
            let mut r = Response::new(Full::from(body));
            if let Some(l) = link {
                r.headers_mut().insert("link", l.parse().unwrap());
            }
            Ok(r)
        }
    })
}

#[tokio::test]
async fn a_cursor_seen_twice_is_a_loop() {
    let api = scripted(vec![
        ("cursor=b".into(), None, r#"{"data":[3],"next":"a"}"#.into()),
        ("cursor=a".into(), None, r#"{"data":[2],"next":"b"}"#.into()),
        ("".into(), None, r#"{"data":[1],"next":"a"}"#.into()),
    ]);
    let pager = Paginate::new(
        api,
        "http://api.example.com/x",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let mut got = Vec::new();
    let mut s = pager.items();
    let e = loop {
        match s.try_next().await {
            Ok(Some(v)) => got.push(v),
            Ok(None) => panic!("the loop was not caught"),
            Err(e) => break e,
        }
    };
    assert_eq!(
        got,
        [
            serde_json::json!(1),
            serde_json::json!(2),
            serde_json::json!(3)
        ]
    );
    assert_eq!(e.kind(), &ErrorKind::Pagination);
    assert!(e.to_string().contains("pagination loop"), "{e}");
}

#[tokio::test]
async fn a_next_link_to_another_origin_is_refused() {
    let api = scripted(vec![(
        "".into(),
        Some(r#"<https://evil.example/steal?page=2>; rel="next""#.into()),
        "[1,2]".into(),
    )]);
    let pager = Paginate::new(
        api.clone(),
        "https://api.example.com/x",
        LinkHeader::new(""),
    )
    .unwrap();
    let e = pager.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert!(
        e.to_string().contains(
            "refusing to follow the next link of page 1 to another origin (https://evil.example)"
        ),
        "{e}"
    );
    // Allowed explicitly: it is followed (here the same script answers again: a loop, caught).
    let pager = Paginate::builder(api, "https://api.example.com/x", LinkHeader::new(""))
        .with_foreign_origin_allowed(true)
        .build()
        .unwrap();
    let e = pager.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
}

#[tokio::test]
async fn max_pages_and_max_items_stop_with_a_clear_error() {
    let s = server(0.0).await;
    let pager = Paginate::builder(
        stack(),
        &s.url("/orders"),
        JsonCursor::new("/data", "/next_cursor"),
    )
    .with_page_size(100)
    .with_max_pages(3)
    .build()
    .unwrap();
    let mut n = 0;
    let mut st = pager.items();
    let e = loop {
        match st.try_next().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("not bounded"),
            Err(e) => break e,
        }
    };
    assert_eq!(n, 300, "the items before the bound were yielded");
    assert!(
        e.to_string().contains("stopped after 3 pages (max_pages)"),
        "{e}"
    );
    let pager = Paginate::builder(
        stack(),
        &s.url("/orders"),
        JsonCursor::new("/data", "/next_cursor"),
    )
    .with_page_size(100)
    .with_max_items(250)
    .build()
    .unwrap();
    let e = pager.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert!(
        e.to_string()
            .contains("stopped at 250 items (max_items) on page 3"),
        "{e}"
    );
}

#[tokio::test]
async fn a_malformed_page_names_its_number() {
    let api = scripted(vec![
        ("cursor=2".into(), None, r#"{"items":[]}"#.into()),
        ("".into(), None, r#"{"data":[1],"next":"2"}"#.into()),
    ]);
    let pager = Paginate::new(
        api.clone(),
        "http://api.example.com/x",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let e = pager.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "page 2 (/x) is not the expected JSON: `/data` is missing"
    );
    let html = scripted(vec![("".into(), None, "<html>".into())]);
    let pager = Paginate::new(
        html,
        "http://api.example.com/x",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let e = pager.page(None, 5).await.unwrap_err();
    assert!(e.to_string().starts_with("page 1 (/x) is not JSON"), "{e}");
}

#[tokio::test]
async fn an_error_status_stops_the_walk() {
    let s = ChaosServer::start(Knobs {
        orders: 50,
        error_rate: 1.0,
        error_status: 404,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let pager = Paginate::new(
        http_client(),
        &s.url("/orders"),
        JsonCursor::new("/data", "/next_cursor"),
    )
    .unwrap();
    let e = pager.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert_eq!(e.to_string(), "page 1 (/orders) answered 404 Not Found");
}

#[tokio::test]
async fn a_server_that_caps_the_page_size_is_walked_correctly() {
    // The chaos server serves at most 100 per page; ask for 500.
    let s = server(0.0).await;
    let count = |items: Vec<serde_json::Value>| items.len();
    // With a total, every order once.
    let pager = Paginate::builder(
        stack(),
        &s.url("/orders/pages"),
        PageNumber::new("/items").with_total("/total"),
    )
    .with_page_size(500)
    .build()
    .unwrap();
    assert_eq!(count(pager.items().try_collect().await.unwrap()), ORDERS);
    let pager = Paginate::builder(
        stack(),
        &s.url("/orders/offset"),
        OffsetLimit::new("/items").with_total("/total"),
    )
    .with_page_size(500)
    .build()
    .unwrap();
    assert_eq!(count(pager.items().try_collect().await.unwrap()), ORDERS);
    // Without a total, a capped page looks short and the walk ends after it: why the total
    // matters when a server may cap.
    let pager = Paginate::builder(stack(), &s.url("/orders/pages"), PageNumber::new("/items"))
        .with_page_size(500)
        .build()
        .unwrap();
    assert_eq!(count(pager.items().try_collect().await.unwrap()), 100);
}
