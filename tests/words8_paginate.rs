//! docs/guides/paginate.md and sturdy-paginate's rustdoc, read literally: the guide's snippets,
//! what `page()` asks of the server (`min(limit, 100)`, `with_page_size`), a limit of 0 and one
//! above `max_items`, headers on every page, a cursor past `MAX_CURSOR_LEN`, clones sharing the
//! cursor key, `Debug` without the key, and "returns all its items or fails as a whole".
//! In process.
#![cfg(feature = "full")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::core::{BoxError, ErrorKind};
use sturdy::paginate::{JsonCursor, Paginate, MAX_CURSOR_LEN};
use tower::service_fn;

/// An API of `total` items behind `?cursor=<offset>&limit=<n>` (default 20, no cap unless
/// `cap`), logging each request's query and its `x-tenant` header; `fail_from` makes every
/// page starting at or past that offset a 500.
#[derive(Clone, Default)]
struct Api {
    log: Arc<Mutex<Vec<(String, Option<String>)>>>,
}

impl Api {
    fn service(
        &self,
        total: usize,
        fail_from: Option<usize>,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + Sync
           + 'static {
        let log = self.log.clone();
        service_fn(move |req: Request<Full<Bytes>>| {
            let q = req.uri().query().unwrap_or("").to_owned();
            let tenant = req
                .headers()
                .get("x-tenant")
                .map(|v| v.to_str().unwrap().to_owned());
            log.lock().unwrap().push((q.clone(), tenant));
            let param = |name: &str| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_owned))
            };
            let start: usize = param("cursor").map_or(0, |c| c.parse().unwrap());
            let limit: usize = param("limit").map_or(20, |c| c.parse().unwrap());
            async move {
                if fail_from.is_some_and(|f| start >= f) {
                    return Ok::<_, BoxError>(
                        Response::builder()
                            .status(StatusCode::INTERNAL_SERVER_ERROR)
                            .body(Full::<Bytes>::default())
                            .unwrap(),
                    );
                }
                let end = (start + limit).min(total);
                let next = if end < total {
                    serde_json::json!(end.to_string())
                } else {
                    serde_json::Value::Null
                };
                let body = serde_json::json!({"data": (start..end).collect::<Vec<_>>(), "next_cursor": next});
                Ok(Response::new(Full::<Bytes>::from(body.to_string())))
            }
        })
    }
    fn queries(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(q, _)| q.clone())
            .collect()
    }
}

fn strategy() -> JsonCursor {
    JsonCursor::new("/data", "/next_cursor")
}

#[derive(Debug, serde::Deserialize, PartialEq)]
#[serde(transparent)]
struct Order(u64);

/// The guide's first snippet: `items_as`, then a bounded `page()` with an optional cursor.
#[tokio::test]
async fn the_guides_first_snippet_walks_and_pages() -> Result<(), BoxError> {
    let api = Api::default();
    let client = api.service(45, None);
    let cursor: Option<String> = None;
    let pager = Paginate::new(client, "https://api.example.com/orders", strategy())?;
    let all: Vec<Order> = pager.items_as::<Order>().try_collect().await?; // lazy, page by page
    let page = pager.page(cursor.as_deref(), 20).await?; // for an agent tool
    assert_eq!(all.len(), 45);
    assert_eq!(all[44], Order(44));
    assert_eq!((page.items.len(), page.has_more), (20, true));
    Ok(())
}

/// The guide's settings snippet compiles with a 32-byte key.
#[tokio::test]
async fn the_guides_settings_snippet_builds() {
    let key_from_your_secret_store = [7u8; 32];
    let client = Api::default().service(5, None);
    let pager = Paginate::builder(client, "https://api.example.com/orders", strategy())
        .with_page_size(100)
        .with_page_timeout(Duration::from_secs(20))
        .with_cursor_key(key_from_your_secret_store) // cursors survive restarts
        .build();
    assert!(pager.is_ok());
}

/// "`with_page_size` | the strategy's in walks; `min(limit, 100)` in `page()`".
#[tokio::test]
async fn page_asks_for_min_limit_100_unless_a_page_size_is_set() {
    let api = Api::default();
    let pager = Paginate::new(
        api.service(1000, None),
        "http://api.example.com/o",
        strategy(),
    )
    .unwrap();
    let p = pager.page(None, 7).await.unwrap();
    assert_eq!(p.items.len(), 7);
    let p = pager.page(None, 250).await.unwrap();
    assert_eq!(p.items.len(), 250);
    let q = api.queries();
    assert!(q[0].contains("limit=7"), "{q:?}");
    assert!(q[1..].iter().all(|q| q.contains("limit=100")), "{q:?}");
    assert_eq!(q.len(), 4, "7, then 100 + 100 + 100 for 250: {q:?}");

    let api = Api::default();
    let pager = Paginate::builder(
        api.service(1000, None),
        "http://api.example.com/o",
        strategy(),
    )
    .with_page_size(30)
    .build()
    .unwrap();
    pager.page(None, 7).await.unwrap();
    assert!(api.queries()[0].contains("limit=30"), "{:?}", api.queries());
}

/// "A `limit` of 0 reads as 1, and one above `with_max_items` as that bound."
#[tokio::test]
async fn a_zero_limit_reads_as_one_and_a_huge_one_as_max_items() {
    let api = Api::default();
    let pager = Paginate::builder(
        api.service(1000, None),
        "http://api.example.com/o",
        strategy(),
    )
    .with_max_items(15)
    .build()
    .unwrap();
    let p = pager.page(None, 0).await.unwrap();
    assert_eq!(p.items.len(), 1);
    assert!(p.has_more);
    let p = pager.page(None, usize::MAX).await.unwrap();
    assert_eq!(p.items.len(), 15);
    assert!(p.has_more);
    let next = pager.page(p.next_cursor.as_deref(), 1).await.unwrap();
    assert_eq!(next.items, [serde_json::json!(15)]);
}

/// `with_header`: "Sends `name: value` with every page request."
#[tokio::test]
async fn with_header_goes_on_every_page_request() {
    let api = Api::default();
    let pager = Paginate::builder(
        api.service(50, None),
        "http://api.example.com/o",
        strategy(),
    )
    .with_header(
        HeaderName::from_static("x-tenant"),
        HeaderValue::from_static("t-1"),
    )
    .build()
    .unwrap();
    let all: Vec<serde_json::Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 50);
    let p = pager.page(None, 30).await.unwrap();
    pager.page(p.next_cursor.as_deref(), 30).await.unwrap();
    let log = api.log.lock().unwrap().clone();
    assert!(log.len() >= 5);
    assert!(
        log.iter().all(|(_, t)| t.as_deref() == Some("t-1")),
        "{log:?}"
    );
}

/// "A cursor is at most 16 KiB (`MAX_CURSOR_LEN`)": a longer one is refused before any request,
/// as a `Pagination` error.
#[tokio::test]
async fn a_cursor_past_max_cursor_len_is_refused_before_any_request() {
    assert_eq!(MAX_CURSOR_LEN, 16 * 1024);
    let api = Api::default();
    let pager = Paginate::new(
        api.service(50, None),
        "http://api.example.com/o",
        strategy(),
    )
    .unwrap();
    let p = pager.page(None, 10).await.unwrap();
    let good = p.next_cursor.unwrap();
    assert!(good.len() <= MAX_CURSOR_LEN);
    let before = api.queries().len();
    let long = format!("{good}{}", "A".repeat(MAX_CURSOR_LEN));
    let e = pager.page(Some(&long), 10).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Pagination, "{e}");
    assert_eq!(api.queries().len(), before, "no request was sent");
    assert!(
        !e.to_string().contains(&long[..64]),
        "the message does not echo the cursor"
    );
}

/// "Cheap to clone: clones share the configuration and the cursor key."
#[tokio::test]
async fn a_clone_accepts_the_cursors_of_its_original() {
    let api = Api::default();
    let pager = Paginate::new(
        api.service(50, None),
        "http://api.example.com/o",
        strategy(),
    )
    .unwrap();
    let clone = pager.clone();
    let p = pager.page(None, 10).await.unwrap();
    let n = clone.page(p.next_cursor.as_deref(), 10).await.unwrap();
    assert_eq!(n.items[0], serde_json::json!(10));
    // Another pager (its own random key) refuses it.
    let other = Paginate::new(
        api.service(50, None),
        "http://api.example.com/o",
        strategy(),
    )
    .unwrap();
    let e = other.page(p.next_cursor.as_deref(), 10).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Pagination);
}

/// "The key never appears in `Debug` output."
#[test]
fn debug_shows_no_cursor_key() {
    let key = b"0123456789abcdef0123456789ABCDEF-secret-key".to_vec();
    let builder = Paginate::builder(
        Api::default().service(1, None),
        "http://api.example.com/o",
        strategy(),
    )
    .with_cursor_key(&key);
    let b = format!("{builder:?}");
    let pager = builder.build().unwrap();
    let p = format!("{pager:?}");
    for shown in [b, p] {
        assert!(!shown.contains("secret-key"), "{shown}");
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(
            !shown.contains("48, 49, 50, 51"),
            "the key's bytes: {shown}"
        );
    }
}

/// "A `page()` call returns all its items or fails as a whole: the items it had read before an
/// error are not returned", with the kind of the failing page's status.
#[tokio::test]
async fn a_page_call_that_fails_midway_returns_nothing() {
    let api = Api::default();
    let pager = Paginate::builder(
        api.service(1000, Some(20)),
        "http://api.example.com/o",
        strategy(),
    )
    .with_page_size(20)
    .build()
    .unwrap();
    let e = pager.page(None, 30).await.unwrap_err();
    assert_eq!(
        e.kind(),
        &ErrorKind::Server(StatusCode::INTERNAL_SERVER_ERROR),
        "{e}"
    );
    assert_eq!(api.queries().len(), 2);
    // The first 20 alone are fine.
    let p = pager.page(None, 20).await.unwrap();
    assert_eq!(p.items.len(), 20);
}

/// "`Paginate::new(service, uri, strategy)` uses the defaults" and reports a relative URI as a
/// `Config` error, before any page.
#[tokio::test]
async fn new_refuses_a_relative_uri_before_any_page() {
    let api = Api::default();
    let e = Paginate::new(api.service(5, None), "/orders", strategy()).unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config);
    let e = Paginate::new(api.service(5, None), "api.example.com/orders", strategy()).unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config);
    assert!(api.queries().is_empty());
}

/// No guard's message repeats the secrets a URI may carry (userinfo, a query's API key): a
/// failed page, a malformed page, a foreign next link, a loop and a bound, through a first page
/// URI and next links that carry them.
async fn guard_messages_keep_secrets(modes: &[&'static str]) {
    use sturdy::paginate::LinkHeader;
    // Page `n` answers per `mode`; its next link carries the secrets too.
    let make = |mode: &'static str| {
        service_fn(move |req: Request<Full<Bytes>>| {
            let q = req.uri().query().unwrap_or("").to_owned();
            async move {
                let page: u32 = q
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("page="))
                    .map_or(1, |p| p.parse().unwrap());
                let next = match mode {
                    "foreign" => "http://evil.example.net/o?page=2&api_key=SECRETKEY".to_owned(),
                    "loop" => "http://user:hunter2@api.example.com/o?api_key=SECRETKEY".to_owned(),
                    "badlink" => {
                        "http://user:hunter2@api.example.com/o?api_key=SECRETKEY&x=a b".to_owned()
                    }
                    _ => format!(
                        "http://user:hunter2@api.example.com/o?page={}&api_key=SECRETKEY",
                        page + 1
                    ),
                };
                let (status, body) = match mode {
                    "500" if page == 2 => (500, "[]".to_owned()),
                    "json" if page == 2 => (200, "{not json".to_owned()),
                    _ => (200, "[1]".to_owned()),
                };
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(status)
                        .header("link", format!("<{next}>; rel=\"next\""))
                        .body(Full::<Bytes>::from(body))
                        .unwrap(),
                )
            }
        })
    };
    let first = "http://user:hunter2@api.example.com/o?api_key=SECRETKEY";
    for &mode in modes {
        let pager = Paginate::builder(make(mode), first, LinkHeader::new(""))
            .with_max_pages(3)
            .build()
            .unwrap();
        let res: Result<Vec<serde_json::Value>, _> = pager.items().try_collect().await;
        let e = res.expect_err(mode);
        let page_err = pager.page(None, 50).await.expect_err(mode);
        for shown in [
            e.to_string(),
            format!("{e:?}"),
            page_err.to_string(),
            format!("{page_err:?}"),
        ] {
            assert!(!shown.contains("hunter2"), "{mode}: {shown}");
            assert!(!shown.contains("SECRETKEY"), "{mode}: {shown}");
        }
    }
}

/// No guard's message repeats the secrets a URI may carry (userinfo, a query's API key): a
/// failed page, a malformed page, a foreign next link and a bound, through a first page URI and
/// next links that carry them.
#[tokio::test]
async fn guard_messages_do_not_repeat_userinfo_or_the_query() {
    guard_messages_keep_secrets(&["500", "json", "foreign", "bound"]).await;
}

/// The same for the loop guard: a next link that leads back to a page read already.
#[tokio::test]
async fn a_loop_message_does_not_repeat_the_next_links_userinfo_or_query() {
    guard_messages_keep_secrets(&["loop"]).await;
}

/// The same for a next link that is not a valid URI.
#[tokio::test]
async fn an_invalid_next_link_message_does_not_repeat_its_userinfo_or_query() {
    guard_messages_keep_secrets(&["badlink"]).await;
}

/// A page that was requested and then failed (an error status, a body too large, a body that
/// stalls past the page timeout, a page that is not JSON) reached the server: its error must
/// not say the request was never sent.
#[tokio::test(start_paused = true)]
async fn failed_pages_that_reached_the_server_never_say_not_sent() {
    use sturdy::core::classify::delivery;
    use sturdy::core::Delivery;
    let mk = |mode: &'static str| {
        service_fn(move |_req: Request<Full<Bytes>>| async move {
            let (status, body) = match mode {
                "500" => (500, "{}".to_owned()),
                "big" => (200, format!("{{\"data\":[\"{}\"]}}", "x".repeat(4096))),
                "json" => (200, "not json".to_owned()),
                _ => {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    (200, "{}".to_owned())
                }
            };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::from(body))
                    .unwrap(),
            )
        })
    };
    for mode in ["500", "big", "json", "slow"] {
        let pager = Paginate::builder(mk(mode), "http://api.example.com/o", strategy())
            .with_max_page_bytes(1024)
            .build()
            .unwrap();
        let e = pager.page(None, 10).await.unwrap_err();
        assert_ne!(delivery(&e), Delivery::NotSent, "{mode}: {e}");
    }
}

/// "A next link to another origin is refused unless `.with_foreign_origin_allowed(true)`": a
/// next link whose port is out of range (`:99999`) is not the first page's origin (port 80), so
/// it must be refused (as foreign, or as not a URL) before any request goes to it.
#[tokio::test]
async fn a_next_link_with_an_out_of_range_port_is_not_followed() {
    use sturdy::paginate::LinkHeader;
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let api = service_fn(move |req: Request<Full<Bytes>>| {
        s.lock().unwrap().push(req.uri().to_string());
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .header(
                        "link",
                        "<http://api.example.com:99999/o?page=2>; rel=\"next\"",
                    )
                    .body(Full::<Bytes>::from("[1]"))
                    .unwrap(),
            )
        }
    });
    let pager = Paginate::new(api, "http://api.example.com/o", LinkHeader::new("")).unwrap();
    let res: Result<Vec<serde_json::Value>, _> = pager.items().try_collect().await;
    let e = res.expect_err("the walk cannot go on");
    assert_eq!(e.kind(), &ErrorKind::Pagination, "{e}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, ["http://api.example.com/o"], "{e}");
}
