//! s53 outside round: docs/guides/paginate.md and the rustdoc of sturdy-paginate read sentence
//! by sentence, against hostile `Link` headers, forged cursors and a real json-server-like
//! server on 127.0.0.1:0.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap as AxHeaders;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sturdy::core::ErrorKind;
use sturdy::paginate::{JsonCursor, LinkHeader, OffsetLimit, PageNumber, Paginate, MAX_CURSOR_LEN};
use tower::service_fn;

const BASE: &str = "http://api.example.com/v1/items";

type Log = Arc<Mutex<Vec<String>>>;

/// A mock API: `answer(uri)` gives (status, link headers, body); every request URI is logged.
fn api<F>(
    answer: F,
) -> (
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    Log,
)
where
    F: Fn(&str) -> (u16, Vec<String>, String) + Send + Sync + 'static,
{
    let log: Log = Arc::default();
    let seen = log.clone();
    let answer = Arc::new(answer);
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        let uri = req.uri().to_string();
        seen.lock().unwrap().push(uri.clone());
        let (status, links, body) = answer(&uri);
        let mut b = Response::builder().status(status);
        for l in links {
            b = b.header("link", l);
        }
        let resp = b.body(Full::from(body)).unwrap();
        async move { Ok::<_, Infallible>(resp) }
    });
    (svc, log)
}

fn items(range: std::ops::Range<usize>) -> String {
    json!(range.collect::<Vec<_>>()).to_string()
}

fn nums(v: &[Value]) -> Vec<u64> {
    v.iter().map(|x| x.as_u64().unwrap()).collect()
}

/// A two-page Link API: the first page (no `page=2` in the URI) carries `link`; page 2 none.
fn two_pages(link: &'static str) -> (impl Fn(&str) -> (u16, Vec<String>, String), ()) {
    (
        move |uri: &str| {
            if uri.contains("page=2") {
                (200, vec![], items(3..6))
            } else {
                (200, vec![link.to_owned()], items(0..3))
            }
        },
        (),
    )
}

async fn walk<S>(pager: &Paginate<S>) -> (Vec<u64>, Option<sturdy::core::Error>)
where
    S: sturdy::paginate::PageStrategy,
{
    let mut out = Vec::new();
    let mut s = pager.items();
    while let Some(r) = s.next().await {
        match r {
            Ok(v) => out.push(v.as_u64().unwrap()),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

fn link_pager(link: &'static str) -> (Paginate<LinkHeader>, Log) {
    let (f, ()) = two_pages(link);
    let (svc, log) = api(f);
    (Paginate::new(svc, BASE, LinkHeader::new("")).unwrap(), log)
}

// ---------------------------------------------------------------------------------------------
// LinkHeader: RFC 8288 parsing, as the guide promises ("`LinkHeader` (RFC 8288, relative links
// resolved)").

#[tokio::test]
async fn s53_link_unquoted_and_quoted_rel_are_the_same() {
    for link in [
        "<http://api.example.com/v1/items?page=2>; rel=next",
        "<http://api.example.com/v1/items?page=2>; rel=\"next\"",
        "<http://api.example.com/v1/items?page=2> ; rel = \"next\"",
    ] {
        let (pager, log) = link_pager(link);
        let (got, err) = walk(&pager).await;
        assert!(err.is_none(), "{link}: {err:?}");
        assert_eq!(got, [0, 1, 2, 3, 4, 5], "{link}");
        assert_eq!(log.lock().unwrap().len(), 2, "{link}");
    }
}

#[tokio::test]
async fn s53_link_rel_is_case_insensitive() {
    // RFC 8288 §2.1.1: registered relation types are compared case-insensitively.
    let (pager, _log) = link_pager("<http://api.example.com/v1/items?page=2>; rel=\"Next\"");
    let (got, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, [0, 1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn s53_link_rel_with_several_types_includes_next() {
    // RFC 8288 §3.3: `rel="a b"` is one link per relation type.
    let (pager, _log) = link_pager("<http://api.example.com/v1/items?page=2>; rel=\"last next\"");
    let (got, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, [0, 1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn s53_link_quoted_comma_cannot_inject_a_next() {
    // A title that quotes a comma and a fake link: the real next is the second link.
    let (svc, log) = api(|uri: &str| {
        if uri.contains("page=2") {
            (200, vec![], items(3..6))
        } else if uri.contains("page=666") {
            (200, vec![], items(666..667))
        } else {
            (
                200,
                vec!["<http://api.example.com/v1/items?page=0>; rel=\"prev\"; title=\"x, <http://api.example.com/v1/items?page=666>; rel=next\", <http://api.example.com/v1/items?page=2>; rel=\"next\"".into()],
                items(0..3),
            )
        }
    });
    let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
    let (got, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, [0, 1, 2, 3, 4, 5], "log: {:?}", log.lock().unwrap());
}

#[tokio::test]
async fn s53_link_second_rel_param_is_ignored() {
    // RFC 8288 §3.3: "occurrences after the first MUST be ignored by parsers".
    let (pager, log) =
        link_pager("<http://api.example.com/v1/items?page=2>; rel=\"prev\"; rel=\"next\"");
    let (got, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, [0, 1, 2], "log: {:?}", log.lock().unwrap());
}

#[tokio::test]
async fn s53_link_split_over_two_field_lines() {
    let (svc, _log) = api(|uri: &str| {
        if uri.contains("page=2") {
            (200, vec![], items(3..6))
        } else {
            (
                200,
                vec![
                    "<http://api.example.com/v1/items?page=9>; rel=\"last\"".into(),
                    "<http://api.example.com/v1/items?page=2>; rel=\"next\"".into(),
                ],
                items(0..3),
            )
        }
    });
    let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
    let (got, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, [0, 1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn s53_link_relative_next_links_are_resolved_against_the_page() {
    for (link, want) in [
        (
            "<?page=2>; rel=\"next\"",
            "http://api.example.com/v1/items?page=2",
        ),
        (
            "</v1/items?page=2>; rel=\"next\"",
            "http://api.example.com/v1/items?page=2",
        ),
        (
            "<items?page=2>; rel=\"next\"",
            "http://api.example.com/v1/items?page=2",
        ),
        (
            "<../v1/items?page=2>; rel=\"next\"",
            "http://api.example.com/v1/items?page=2",
        ),
        (
            "<./items?page=2>; rel=\"next\"",
            "http://api.example.com/v1/items?page=2",
        ),
        (
            "<//api.example.com/v1/items?page=2>; rel=\"next\"",
            "http://api.example.com/v1/items?page=2",
        ),
    ] {
        let (pager, log) = link_pager(link);
        let (got, err) = walk(&pager).await;
        assert!(err.is_none(), "{link}: {err:?}");
        assert_eq!(got, [0, 1, 2, 3, 4, 5], "{link}");
        assert_eq!(log.lock().unwrap()[1], want, "{link}");
    }
}

#[tokio::test]
async fn s53_link_foreign_next_is_refused_and_not_fetched() {
    for link in [
        "<http://evil.example/v1/items?page=2>; rel=\"next\"",
        "<//evil.example/v1/items?page=2>; rel=\"next\"",
        "<https://api.example.com/v1/items?page=2>; rel=\"next\"",
        "<http://api.example.com:8080/v1/items?page=2>; rel=\"next\"",
        "<ftp://api.example.com/v1/items?page=2>; rel=\"next\"",
    ] {
        let (pager, log) = link_pager(link);
        let (got, err) = walk(&pager).await;
        assert_eq!(got, [0, 1, 2], "{link}: the first page's items come first");
        let err = err.unwrap_or_else(|| panic!("{link}: the walk must end with an error"));
        assert_eq!(*err.kind(), ErrorKind::Pagination, "{link}: {err}");
        assert_eq!(log.lock().unwrap().len(), 1, "{link}: nothing else fetched");
    }
}

#[tokio::test]
async fn s53_link_same_origin_written_differently_is_followed() {
    // Scheme and host in any case, the default port written or not: one origin.
    let (pager, log) = link_pager("<HTTP://API.Example.COM:80/v1/items?page=2>; rel=\"next\"");
    let (got, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, [0, 1, 2, 3, 4, 5]);
    assert_eq!(log.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn s53_foreign_origin_error_shows_no_credential() {
    let (pager, _log) = link_pager(
        "<http://admin:hunter2pw@evil.example/v1/items?page=2&access_token=tok_S53SECRET#frag>; rel=\"next\"",
    );
    let (_got, err) = walk(&pager).await;
    let err = err.expect("foreign link refused");
    let words = format!("{err} | {err:?}");
    for secret in ["hunter2pw", "tok_S53SECRET", "admin:"] {
        assert!(!words.contains(secret), "{secret} leaked: {words}");
    }
    assert!(!err.to_string().is_empty());
}

#[tokio::test]
async fn s53_loop_back_to_the_first_page_written_differently_ends_with_a_loop_error() {
    let (svc, log) = api(|uri: &str| {
        if uri.contains("page=2") {
            (
                200,
                vec!["<HTTP://API.EXAMPLE.COM:80/v1/items>; rel=\"next\"".into()],
                items(3..6),
            )
        } else {
            (200, vec!["<?page=2>; rel=\"next\"".into()], items(0..3))
        }
    });
    let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
    let (got, err) = walk(&pager).await;
    assert_eq!(got, [0, 1, 2, 3, 4, 5], "page 2 is yielded, no item twice");
    let err = err.expect("a loop error");
    assert_eq!(*err.kind(), ErrorKind::Pagination, "{err}");
    assert_eq!(
        log.lock().unwrap().len(),
        2,
        "the first page is not fetched again"
    );
}

#[tokio::test]
async fn s53_self_link_on_the_only_page_is_a_loop_after_its_items() {
    let (svc, log) = api(|_uri: &str| (200, vec!["<>; rel=\"next\"".into()], items(0..3)));
    let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
    let (got, err) = walk(&pager).await;
    assert_eq!(got, [0, 1, 2]);
    assert_eq!(*err.expect("loop").kind(), ErrorKind::Pagination);
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn s53_huge_link_header_with_thousands_of_rels_is_parsed_quickly() {
    let mut many = String::new();
    for i in 0..5_000 {
        many.push_str(&format!(
            "<http://api.example.com/v1/items?x={i}>; rel=\"item\"; title=\"t,{i};\", "
        ));
    }
    many.push_str("<http://api.example.com/v1/items?page=2>; rel=\"next\"");
    let many: &'static str = Box::leak(many.into_boxed_str());
    let (pager, log) = link_pager(many);
    let t = tokio::time::Instant::now();
    let (got, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, [0, 1, 2, 3, 4, 5]);
    assert_eq!(
        log.lock().unwrap()[1],
        "http://api.example.com/v1/items?page=2"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test]
async fn s53_malformed_link_headers_do_not_panic_or_fetch_garbage() {
    for link in [
        "<http://api.example.com/v1/items?page=2>; rel=\"next",
        "<http://api.example.com/v1/items?page=2; rel=\"next\"",
        "http://api.example.com/v1/items?page=2; rel=\"next\"",
        "<>>; rel=next",
        "<http://api.example.com/v1/items?page=2>; rel=\"\\\"next\\\"\"",
        ";;;,,,<<<>>>\"\"\"",
        "<http://api.example.com/v1/items?page=2>; rel",
        "<http://api.example.com/v1/items?page=2>; =next",
        "<http://[::1/v1/items?page=2>; rel=next",
        "<http://api.example.com:99999/v1/items?page=2>; rel=next",
    ] {
        let (pager, log) = link_pager(link);
        let (got, _err) = walk(&pager).await;
        assert!(got.starts_with(&[0, 1, 2]), "{link}: {got:?}");
        let log = log.lock().unwrap();
        assert!(log.len() <= 2, "{link}: {log:?}");
        for u in log.iter() {
            assert!(
                u.starts_with("http://api.example.com/"),
                "{link}: fetched {u}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Failed pages mid-stream.

#[tokio::test]
async fn s53_an_error_page_mid_stream_ends_the_stream_after_its_error() {
    for (status, kind) in [
        (500, ErrorKind::Server(StatusCode::INTERNAL_SERVER_ERROR)),
        (503, ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE)),
        (404, ErrorKind::Client(StatusCode::NOT_FOUND)),
    ] {
        let (svc, log) = api(move |uri: &str| {
            if uri.contains("page=2") {
                (status, vec![], "{\"error\":\"boom\"}".into())
            } else {
                (200, vec!["<?page=2>; rel=next".into()], items(0..3))
            }
        });
        let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
        let mut s = pager.items();
        let mut got = Vec::new();
        let mut errs = Vec::new();
        while let Some(r) = s.next().await {
            match r {
                Ok(v) => got.push(v),
                Err(e) => errs.push(e),
            }
        }
        assert_eq!(nums(&got), [0, 1, 2]);
        assert_eq!(errs.len(), 1, "{status}: one error, then the end");
        assert_eq!(*errs[0].kind(), kind, "{status}: {}", errs[0]);
        assert!(s.next().await.is_none(), "polled again after the end");
        assert_eq!(log.lock().unwrap().len(), 2);
    }
}

#[tokio::test]
async fn s53_a_page_that_is_not_json_is_named_by_its_number() {
    let (svc, _log) = api(|uri: &str| {
        if uri.contains("page=3") {
            (200, vec![], "<html>oops</html>".into())
        } else if uri.contains("page=2") {
            (200, vec!["<?page=3>; rel=next".into()], items(3..6))
        } else {
            (200, vec!["<?page=2>; rel=next".into()], items(0..3))
        }
    });
    let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
    let (got, err) = walk(&pager).await;
    assert_eq!(got, [0, 1, 2, 3, 4, 5]);
    let err = err.expect("bad page");
    assert_eq!(*err.kind(), ErrorKind::Pagination);
    assert!(err.to_string().contains('3'), "names page 3: {err}");
}

#[tokio::test]
async fn s53_dropping_a_stream_mid_page_fetches_nothing_more() {
    let (svc, log) = api(|uri: &str| {
        if uri.contains("page=2") {
            (200, vec![], items(3..6))
        } else {
            (200, vec!["<?page=2>; rel=next".into()], items(0..3))
        }
    });
    let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
    {
        let mut s = pager.items();
        assert_eq!(s.next().await.unwrap().unwrap(), 0);
    }
    tokio::task::yield_now().await;
    assert_eq!(log.lock().unwrap().len(), 1);
    // The pager is still usable after a dropped walk, and a new walk starts afresh.
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(nums(&all), [0, 1, 2, 3, 4, 5]);
}

// ---------------------------------------------------------------------------------------------
// Bounds and settings.

fn numbered(total: usize) -> impl Fn(&str) -> (u16, Vec<String>, String) {
    move |uri: &str| {
        let q = uri.split('?').nth(1).unwrap_or("");
        let get = |k: &str| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.parse::<usize>().ok())
        };
        let page = get("page").unwrap_or(1);
        let size = get("per_page").unwrap_or(20);
        let start = ((page - 1) * size).min(total);
        let end = (start + size).min(total);
        (200, vec![], items(start..end))
    }
}

#[tokio::test]
async fn s53_max_items_yields_the_items_before_the_bound_then_an_error() {
    let (svc, _log) = api(numbered(10));
    let pager = Paginate::builder(svc, BASE, PageNumber::new("").with_page_size(3))
        .with_max_items(5)
        .build()
        .unwrap();
    let (got, err) = walk(&pager).await;
    assert_eq!(got, [0, 1, 2, 3, 4]);
    assert_eq!(*err.expect("bound").kind(), ErrorKind::Pagination);

    // Exactly at the bound: no error.
    let (svc, _log) = api(numbered(5));
    let pager = Paginate::builder(svc, BASE, PageNumber::new("").with_page_size(3))
        .with_max_items(5)
        .build()
        .unwrap();
    let (got, err) = walk(&pager).await;
    assert_eq!(got, [0, 1, 2, 3, 4]);
    assert!(
        err.is_none(),
        "exactly max_items items is within the bound: {err:?}"
    );
}

#[tokio::test]
async fn s53_max_pages_bounds_a_walk_and_a_page_call() {
    let (svc, log) = api(numbered(9));
    let pager = Paginate::builder(svc, BASE, PageNumber::new("").with_page_size(3))
        .with_max_pages(2)
        .build()
        .unwrap();
    let (got, err) = walk(&pager).await;
    assert_eq!(got, [0, 1, 2, 3, 4, 5]);
    assert_eq!(*err.expect("bound").kind(), ErrorKind::Pagination);
    assert_eq!(log.lock().unwrap().len(), 2, "no third page fetched");

    // page(): with_page_size(1), a limit of 5 needs 5 pages: fails as a whole.
    let (svc, _log) = api(numbered(9));
    let pager = Paginate::builder(svc, BASE, PageNumber::new(""))
        .with_page_size(1)
        .with_max_pages(2)
        .build()
        .unwrap();
    let err = pager.page(None, 5).await.unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::Pagination, "{err}");
    // Two items fit in two pages.
    let ok = pager.page(None, 2).await.unwrap();
    assert_eq!(nums(&ok.items), [0, 1]);
}

#[tokio::test]
async fn s53_max_page_bytes_is_inclusive_and_one_more_fails_with_body() {
    let body = items(0..50);
    let n = body.len();
    for (limit, ok) in [(n, true), (n - 1, false)] {
        let b = body.clone();
        let (svc, _log) = api(move |_u: &str| (200, vec![], b.clone()));
        let pager = Paginate::builder(svc, BASE, LinkHeader::new(""))
            .with_max_page_bytes(limit)
            .build()
            .unwrap();
        let (got, err) = walk(&pager).await;
        if ok {
            assert!(err.is_none(), "{limit}: {err:?}");
            assert_eq!(got.len(), 50);
        } else {
            assert!(got.is_empty());
            assert_eq!(*err.expect("too big").kind(), ErrorKind::Body, "{limit}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn s53_default_page_timeout_is_sixty_seconds() {
    for (delay, ok) in [(59, true), (61, false)] {
        let svc = service_fn(move |_req: Request<Full<Bytes>>| async move {
            tokio::time::sleep(Duration::from_secs(delay)).await;
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("[1,2]")))
        });
        let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
        let (got, err) = walk(&pager).await;
        if ok {
            assert!(err.is_none(), "{delay}: {err:?}");
            assert_eq!(got, [1, 2]);
        } else {
            assert_eq!(*err.expect("timeout").kind(), ErrorKind::Timeout, "{delay}");
        }
    }
}

#[tokio::test]
async fn s53_build_reports_each_documented_mistake_as_config() {
    fn svc() -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
           + Send
           + 'static {
        api(|_u: &str| (200, vec![], "[]".into())).0
    }
    let cases: Vec<(&str, Result<(), sturdy::core::Error>)> = vec![
        (
            "max_pages 0",
            Paginate::builder(svc(), BASE, LinkHeader::new(""))
                .with_max_pages(0)
                .build()
                .map(drop),
        ),
        (
            "max_items 0",
            Paginate::builder(svc(), BASE, LinkHeader::new(""))
                .with_max_items(0)
                .build()
                .map(drop),
        ),
        (
            "page_size 0",
            Paginate::builder(svc(), BASE, LinkHeader::new(""))
                .with_page_size(0)
                .build()
                .map(drop),
        ),
        (
            "max_page_bytes 0",
            Paginate::builder(svc(), BASE, LinkHeader::new(""))
                .with_max_page_bytes(0)
                .build()
                .map(drop),
        ),
        (
            "timeout 0",
            Paginate::builder(svc(), BASE, LinkHeader::new(""))
                .with_page_timeout(Duration::ZERO)
                .build()
                .map(drop),
        ),
        (
            "key 31",
            Paginate::builder(svc(), BASE, LinkHeader::new(""))
                .with_cursor_key([7u8; 31])
                .build()
                .map(drop),
        ),
        (
            "relative uri",
            Paginate::new(svc(), "/v1/items", LinkHeader::new("")).map(drop),
        ),
        (
            "no scheme",
            Paginate::new(svc(), "api.example.com/v1/items", LinkHeader::new("")).map(drop),
        ),
        (
            "pointer without /",
            Paginate::new(svc(), BASE, JsonCursor::new("data", "/next")).map(drop),
        ),
        (
            "next pointer without /",
            Paginate::new(svc(), BASE, JsonCursor::new("/data", "next")).map(drop),
        ),
        (
            "link pointer without /",
            Paginate::new(svc(), BASE, LinkHeader::new("data")).map(drop),
        ),
        (
            "empty cursor param",
            Paginate::new(
                svc(),
                BASE,
                JsonCursor::new("/data", "/next").with_cursor_param(""),
            )
            .map(drop),
        ),
        (
            "empty page param",
            Paginate::new(svc(), BASE, PageNumber::new("").with_params("", "per_page")).map(drop),
        ),
        (
            "empty offset param",
            Paginate::new(svc(), BASE, OffsetLimit::new("").with_params("offset", "")).map(drop),
        ),
        (
            "page number size 0",
            Paginate::new(svc(), BASE, PageNumber::new("").with_page_size(0)).map(drop),
        ),
        (
            "offset size 0",
            Paginate::new(svc(), BASE, OffsetLimit::new("").with_page_size(0)).map(drop),
        ),
        (
            "total pointer without /",
            Paginate::new(svc(), BASE, OffsetLimit::new("/items").with_total("total")).map(drop),
        ),
    ];
    for (what, r) in cases {
        let e = r.expect_err(what);
        assert_eq!(*e.kind(), ErrorKind::Config, "{what}: {e}");
        assert!(!e.to_string().is_empty(), "{what}");
    }
    // The bounds at 1, a key of exactly 32 bytes: fine.
    Paginate::builder(svc(), BASE, LinkHeader::new(""))
        .with_max_pages(1)
        .with_max_items(1)
        .with_page_size(1)
        .with_max_page_bytes(1)
        .with_page_timeout(Duration::from_nanos(1))
        .with_cursor_key([7u8; 32])
        .build()
        .unwrap();
}

#[tokio::test]
async fn s53_with_header_is_sent_with_every_page() {
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let s2 = seen.clone();
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        s2.lock().unwrap().push(
            req.headers()
                .get("x-s53")
                .map(|v| v.to_str().unwrap().to_owned()),
        );
        let page2 = req.uri().query().is_some_and(|q| q.contains("page=2"));
        let mut b = Response::builder();
        if !page2 {
            b = b.header("link", "<?page=2>; rel=next");
        }
        async move { Ok::<_, Infallible>(b.body(Full::<Bytes>::from("[1]")).unwrap()) }
    });
    let pager = Paginate::builder(svc, BASE, LinkHeader::new(""))
        .with_header(
            HeaderName::from_static("x-s53"),
            HeaderValue::from_static("yes"),
        )
        .build()
        .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        *seen.lock().unwrap(),
        [Some("yes".into()), Some("yes".into())]
    );
}

// ---------------------------------------------------------------------------------------------
// Bounded pages for agent tools.

#[tokio::test]
async fn s53_page_limit_zero_reads_as_one_and_above_max_items_as_max_items() {
    let (svc, _log) = api(numbered(500));
    let pager = Paginate::builder(svc, BASE, PageNumber::new(""))
        .with_max_items(7)
        .build()
        .unwrap();
    let p = pager.page(None, 0).await.unwrap();
    assert_eq!(nums(&p.items), [0]);
    assert!(p.has_more && p.next_cursor.is_some());
    let p = pager.page(None, 1_000_000).await.unwrap();
    assert_eq!(p.items.len(), 7);
    assert!(p.has_more);
}

#[tokio::test]
async fn s53_page_asks_for_min_limit_100_and_resumes_inside_a_server_page() {
    // The server ignores the asked size and serves 5 per page (Link next links).
    let (svc, log) = api(|uri: &str| {
        let q = uri.split('?').nth(1).unwrap_or("");
        let page: usize = q
            .split('&')
            .find_map(|kv| kv.strip_prefix("page="))
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        let start = (page - 1) * 5;
        let end = (start + 5).min(13);
        let links = if end < 13 {
            vec![format!("</v1/items?page={}>; rel=\"next\"", page + 1)]
        } else {
            vec![]
        };
        (200, links, items(start..end))
    });
    let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
    let a = pager.page(None, 3).await.unwrap();
    assert_eq!(nums(&a.items), [0, 1, 2]);
    assert_eq!(log.lock().unwrap()[0], format!("{BASE}?per_page=3"));
    let b = pager.page(a.next_cursor.as_deref(), 4).await.unwrap();
    assert_eq!(
        nums(&b.items),
        [3, 4, 5, 6],
        "across the server's page boundary"
    );
    let c = pager.page(b.next_cursor.as_deref(), 1000).await.unwrap();
    assert_eq!(nums(&c.items), (7..13).collect::<Vec<_>>());
    assert!(!c.has_more);
    assert_eq!(c.next_cursor, None);
    // A limit of 250 asks for 100 per page.
    let _ = pager.page(None, 250).await.unwrap();
    let fetched = log.lock().unwrap().clone();
    assert!(
        fetched.iter().any(|u| u.ends_with("per_page=100")),
        "{fetched:?}"
    );
    // Serialises as the agent guide shows.
    let v = serde_json::to_value(&a).unwrap();
    assert!(
        v.get("items").is_some() && v.get("has_more").is_some() && v.get("next_cursor").is_some()
    );
}

#[tokio::test]
async fn s53_cursors_not_returned_by_this_pager_are_refused_before_any_request() {
    let key = [42u8; 32];
    let (svc, log) = api(numbered(100));
    let pager = Paginate::builder(svc.clone(), BASE, PageNumber::new(""))
        .with_cursor_key(key)
        .build()
        .unwrap();
    let good = pager.page(None, 2).await.unwrap().next_cursor.unwrap();
    let before = log.lock().unwrap().len();

    let mut bad: Vec<String> = Vec::new();
    // Every single-character edit.
    for i in 0..good.len() {
        let mut b = good.clone().into_bytes();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        bad.push(String::from_utf8(b).unwrap());
    }
    bad.push(good[..good.len() - 1].to_owned());
    bad.push(format!("{good}="));
    bad.push(format!("{good}A"));
    bad.push(format!(" {good}"));
    bad.push(String::new());
    bad.push("x".repeat(MAX_CURSOR_LEN + 1));
    bad.push("€".repeat(100));
    for c in &bad {
        let e = pager.page(Some(c), 2).await.unwrap_err();
        assert_eq!(*e.kind(), ErrorKind::Pagination, "{c:.40}: {e}");
        assert!(
            e.to_string().len() < 1000,
            "the message does not echo a huge cursor"
        );
    }
    // Another endpoint with the same key.
    let other = Paginate::builder(
        svc.clone(),
        "http://api.example.com/v1/other",
        PageNumber::new(""),
    )
    .with_cursor_key(key)
    .build()
    .unwrap();
    assert_eq!(
        *other.page(Some(&good), 2).await.unwrap_err().kind(),
        ErrorKind::Pagination
    );
    // Another pager with its own random key.
    let fresh = Paginate::new(svc.clone(), BASE, PageNumber::new("")).unwrap();
    assert_eq!(
        *fresh.page(Some(&good), 2).await.unwrap_err().kind(),
        ErrorKind::Pagination
    );
    assert_eq!(log.lock().unwrap().len(), before, "no request was sent");
    // Same key, same URI: valid across pagers ("cursors survive restarts").
    let again = Paginate::builder(svc, BASE, PageNumber::new(""))
        .with_cursor_key(key)
        .build()
        .unwrap();
    assert_eq!(
        nums(&again.page(Some(&good), 2).await.unwrap().items),
        [2, 3]
    );
    // And a clone shares the key.
    let clone = pager.clone();
    assert_eq!(
        nums(&clone.page(Some(&good), 2).await.unwrap().items),
        [2, 3]
    );
}

#[tokio::test]
async fn s53_page_cursor_back_to_its_own_page_is_a_loop_error() {
    // Every page says its next is the first page.
    let (svc, log) = api(|_u: &str| (200, vec![format!("<{BASE}>; rel=next")], items(0..2)));
    let pager = Paginate::new(svc, BASE, LinkHeader::new("").without_limit_param()).unwrap();
    // A call that needs more than one page hits the loop inside the call.
    let e = pager.page(None, 5).await.unwrap_err();
    assert_eq!(*e.kind(), ErrorKind::Pagination, "{e}");
    // A call that ends on the page boundary hands out a cursor; the next call refuses it.
    let p = pager.page(None, 2).await.unwrap();
    if let Some(c) = p.next_cursor {
        let n = log.lock().unwrap().len();
        let e = pager.page(Some(&c), 2).await.unwrap_err();
        assert_eq!(*e.kind(), ErrorKind::Pagination, "{e}");
        assert_eq!(log.lock().unwrap().len(), n, "refused before fetching");
    }
}

#[tokio::test]
async fn s53_a_failed_page_call_returns_no_partial_items() {
    let (svc, _log) = api(|uri: &str| {
        if uri.contains("page=2") {
            (500, vec![], String::new())
        } else {
            (200, vec!["<?page=2>; rel=next".into()], items(0..3))
        }
    });
    let pager = Paginate::new(svc, BASE, LinkHeader::new("").without_limit_param()).unwrap();
    let e = pager.page(None, 5).await.unwrap_err();
    assert_eq!(
        *e.kind(),
        ErrorKind::Server(StatusCode::INTERNAL_SERVER_ERROR),
        "{e}"
    );
    let ok = pager.page(None, 3).await.unwrap();
    assert_eq!(nums(&ok.items), [0, 1, 2]);
}

#[tokio::test]
async fn s53_page_debug_hides_the_next_links_query_and_userinfo() {
    let (svc, _log) = api(|_u: &str| {
        (
            200,
            vec![
                "<http://u:pw_S53@api.example.com/v1/items?page=2&token=tok_S53DBG>; rel=next"
                    .into(),
            ],
            items(0..1),
        )
    });
    let pager = Paginate::builder(svc, BASE, LinkHeader::new(""))
        .with_max_pages(1)
        .build()
        .unwrap();
    let mut s = pager.pages();
    let page = s.next().await.unwrap().unwrap();
    let dbg = format!("{page:?}");
    assert!(
        !dbg.contains("tok_S53DBG") && !dbg.contains("pw_S53"),
        "{dbg}"
    );
    let e = s.next().await;
    if let Some(Err(e)) = e {
        let w = format!("{e} {e:?}");
        assert!(!w.contains("tok_S53DBG") && !w.contains("pw_S53"), "{w}");
    }
}

// ---------------------------------------------------------------------------------------------
// A real json-server-like server on 127.0.0.1:0: `_page`/`_limit`, `Link: <...>; rel="next"`.

#[derive(Clone)]
struct Srv {
    total: usize,
    relative: bool,
    hits: Arc<Mutex<Vec<String>>>,
    fail_once_at: Arc<Mutex<Option<usize>>>,
}

#[derive(serde::Deserialize)]
struct JsQ {
    #[serde(rename = "_page")]
    page: Option<usize>,
    #[serde(rename = "_limit")]
    limit: Option<usize>,
}

async fn json_server(
    State(s): State<Srv>,
    Query(q): Query<JsQ>,
    headers: AxHeaders,
) -> axum::response::Response {
    let page = q.page.unwrap_or(1);
    let limit = q.limit.unwrap_or(10);
    s.hits.lock().unwrap().push(format!("{page}/{limit}"));
    {
        let mut f = s.fail_once_at.lock().unwrap();
        if *f == Some(page) {
            *f = None;
            return (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
        }
    }
    let start = ((page - 1) * limit).min(s.total);
    let end = (start + limit).min(s.total);
    let data: Vec<Value> = (start..end).map(|i| json!({"id": i})).collect();
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut links = vec![format!(
        "<http://{host}/posts?_page=1&_limit={limit}>; rel=\"first\""
    )];
    if end < s.total {
        if s.relative {
            links.push(format!(
                "</posts?_page={}&_limit={limit}>; rel=\"next\"",
                page + 1
            ));
        } else {
            links.push(format!(
                "<http://{host}/posts?_page={}&_limit={limit}>; rel=\"next\"",
                page + 1
            ));
        }
    }
    let last = s.total.div_ceil(limit).max(1);
    links.push(format!(
        "<http://{host}/posts?_page={last}&_limit={limit}>; rel=\"last\""
    ));
    let mut resp = axum::Json(data).into_response();
    resp.headers_mut()
        .insert("link", HeaderValue::from_str(&links.join(", ")).unwrap());
    resp.headers_mut().insert(
        "x-total-count",
        HeaderValue::from_str(&s.total.to_string()).unwrap(),
    );
    resp
}

async fn start(total: usize, relative: bool) -> (String, Srv) {
    let s = Srv {
        total,
        relative,
        hits: Arc::default(),
        fail_once_at: Arc::default(),
    };
    let app = Router::new()
        .route("/posts", get(json_server))
        .with_state(s.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/posts"), s)
}

fn hyper_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

#[tokio::test]
async fn s53_json_server_link_walk_over_a_real_socket() {
    for relative in [false, true] {
        let (url, srv) = start(23, relative).await;
        let pager = Paginate::builder(
            hyper_client(),
            &url,
            LinkHeader::new("").with_limit_param("_limit"),
        )
        .with_page_size(10)
        .with_page_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
        let all: Vec<Value> = pager.items().try_collect().await.unwrap();
        let ids: Vec<u64> = all.iter().map(|v| v["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (0..23).collect::<Vec<_>>(), "relative={relative}");
        assert_eq!(*srv.hits.lock().unwrap(), ["1/10", "2/10", "3/10"]);
    }
}

#[tokio::test]
async fn s53_json_server_bounded_pages_resume_over_a_real_socket() {
    let (url, srv) = start(23, true).await;
    let pager = Paginate::builder(
        hyper_client(),
        &url,
        LinkHeader::new("").with_limit_param("_limit"),
    )
    .with_page_timeout(Duration::from_secs(5))
    .build()
    .unwrap();
    let mut cursor: Option<String> = None;
    let mut ids = Vec::new();
    let mut calls = 0;
    loop {
        let p = pager.page(cursor.as_deref(), 7).await.unwrap();
        calls += 1;
        ids.extend(p.items.iter().map(|v| v["id"].as_u64().unwrap()));
        assert!(p.items.len() <= 7);
        if !p.has_more {
            assert!(p.next_cursor.is_none());
            break;
        }
        cursor = p.next_cursor;
        assert!(calls < 10);
    }
    assert_eq!(ids, (0..23).collect::<Vec<_>>());
    assert!(srv.hits.lock().unwrap().iter().all(|h| h.ends_with("/7")));
}

#[tokio::test]
async fn s53_json_server_through_client_builder_with_retries() {
    let (url, srv) = start(23, false).await;
    *srv.fail_once_at.lock().unwrap() = Some(2);
    let client = sturdy::ClientBuilder::new()
        .with_retry(
            sturdy::retry::RetryLayer::new().with_seed(53).with_backoff(
                sturdy::retry::Backoff::decorrelated_jitter(
                    Duration::from_millis(1),
                    Duration::from_millis(5),
                )
                .unwrap(),
            ),
        )
        .build(hyper_client());
    let pager = Paginate::builder(client, &url, LinkHeader::new("").with_limit_param("_limit"))
        .with_page_size(10)
        .with_page_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 23);
    assert_eq!(
        *srv.hits.lock().unwrap(),
        ["1/10", "2/10", "2/10", "3/10"],
        "page 2's 503 was retried by the stack"
    );
}

#[tokio::test]
async fn s53_a_huge_server_cursor_never_gives_an_over_long_page_cursor() {
    let huge = "c".repeat(MAX_CURSOR_LEN * 2);
    let (svc, _log) = api(move |uri: &str| {
        if uri.contains("cursor=") {
            (200, vec![], json!({"data": [9], "next": null}).to_string())
        } else {
            (
                200,
                vec![],
                json!({"data": [1, 2], "next": huge}).to_string(),
            )
        }
    });
    let pager = Paginate::new(svc, BASE, JsonCursor::new("/data", "/next")).unwrap();
    match pager.page(None, 2).await {
        Ok(p) => {
            let c = p.next_cursor.expect("more");
            assert!(c.len() <= MAX_CURSOR_LEN, "{}", c.len());
        }
        Err(e) => assert_eq!(*e.kind(), ErrorKind::Pagination, "{e}"),
    }
}

#[tokio::test]
async fn s53_page_number_with_total_walks_a_server_that_caps_its_pages() {
    // Asked for 20, the server gives 7: with a total, short pages do not end the walk.
    let (svc, log) = api(|uri: &str| {
        let q = uri.split('?').nth(1).unwrap_or("");
        let page: usize = q
            .split('&')
            .find_map(|kv| kv.strip_prefix("page="))
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        let start = ((page - 1) * 7).min(30);
        let end = (start + 7).min(30);
        (
            200,
            vec![],
            json!({"items": (start..end).collect::<Vec<_>>(), "total": 30}).to_string(),
        )
    });
    let pager = Paginate::new(svc, BASE, PageNumber::new("/items").with_total("/total")).unwrap();
    let (got, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, (0..30).collect::<Vec<_>>());
    let fetched = log.lock().unwrap().clone();
    // PageNumber::with_total: "where the server serves fewer items per page than asked, the
    // short last page counts low, and the walk asks for one more page (empty) before it stops".
    assert_eq!(fetched.len(), 6, "{fetched:?}");
    assert!(fetched[5].contains("page=6"), "{fetched:?}");
}

#[tokio::test]
async fn s53_offset_limit_with_total_stops_on_the_page_that_reaches_it() {
    // OffsetLimit::with_total: "stop on the page that reaches it", even when the server caps.
    let (svc, log) = api(|uri: &str| {
        let q = uri.split('?').nth(1).unwrap_or("");
        let offset: usize = q
            .split('&')
            .find_map(|kv| kv.strip_prefix("offset="))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let start = offset.min(30);
        let end = (start + 7).min(30);
        (
            200,
            vec![],
            json!({"items": (start..end).collect::<Vec<_>>(), "total": 30}).to_string(),
        )
    });
    let pager = Paginate::new(svc, BASE, OffsetLimit::new("/items").with_total("/total")).unwrap();
    let (got, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, (0..30).collect::<Vec<_>>());
    let fetched = log.lock().unwrap().clone();
    assert_eq!(fetched.len(), 5, "{fetched:?}");
}

#[tokio::test]
async fn s53_without_a_total_the_first_short_page_ends_the_walk() {
    let (svc, log) = api(|_uri: &str| (200, vec![], json!({"items": [1, 2, 3]}).to_string()));
    let pager = Paginate::new(svc, BASE, OffsetLimit::new("/items")).unwrap();
    let (got, err) = walk(&pager).await;
    assert!(err.is_none());
    assert_eq!(got, [1, 2, 3]);
    assert_eq!(log.lock().unwrap().len(), 1);
}
