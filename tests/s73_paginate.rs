//! s73 outside round: `sturdy-paginate` and `sturdy-version`, with docs/guides/paginate.md,
//! docs/guides/version.md and docs/guides/agents.md read sentence by sentence. In-process mocks
//! for logic (paused time where it waits), real servers on 127.0.0.1 for the wire. The
//! json-server tests (`s73_json_server_*`) read `STURDY_S73_JSON_SERVER_URL` and pass without
//! it.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use serde_json::{json, Value};
use sturdy::core::summary::{tool_result, ErrorSummary};
use sturdy::core::ErrorKind;
use sturdy::paginate::{JsonCursor, LinkHeader, PageStrategy, Paginate, MAX_CURSOR_LEN};
use sturdy::version::{Notice, VersionLayer};
use tower::{service_fn, Layer, Service, ServiceExt};

const BASE: &str = "http://api.example.com/v1/items";
const KEY: &[u8] = b"s73-shared-cursor-key-0123456789abcdef";

// ---------------------------------------------------------------------------------------------
// helpers

/// Every request URI a mock API saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn push(&self, uri: String) {
        self.0.lock().unwrap().push(uri);
    }
    fn uris(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// (status, headers as raw bytes, body)
type Answer = (u16, Vec<(&'static str, Vec<u8>)>, String);

type Api =
    tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;

/// An in-process API: `answer(n, uri)` (n: 0-based request number) gives the answer.
fn api<F>(answer: F) -> (Api, Seen)
where
    F: Fn(usize, &str) -> Answer + Send + Sync + 'static,
{
    let seen = Seen::default();
    let log = seen.clone();
    let count = Arc::new(AtomicUsize::new(0));
    let answer = Arc::new(answer);
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        let uri = req.uri().to_string();
        log.push(uri.clone());
        let n = count.fetch_add(1, Ordering::SeqCst);
        let (status, headers, body) = answer(n, &uri);
        let mut b = Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(k, http::HeaderValue::from_bytes(&v).unwrap());
        }
        let resp = b.body(Full::from(body)).unwrap();
        async move { Ok::<_, Infallible>(resp) }
    });
    (tower::util::BoxCloneSyncService::new(svc), seen)
}

/// The raw value of query parameter `name` in `uri`.
fn param(uri: &str, name: &str) -> Option<String> {
    let q = uri.split_once('?')?.1;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_owned())
    })
}

/// A JSON-cursor API over fixed pages: `?cursor=i` is page i, `next` is `i+1` or null.
fn cursor_pages(pages: Vec<Vec<u64>>) -> (Api, Seen) {
    api(move |_, uri| {
        let i: usize = param(uri, "cursor").map_or(0, |c| c.parse().unwrap());
        let data = pages.get(i).cloned().unwrap_or_default();
        let next = if i + 1 < pages.len() {
            json!((i + 1).to_string())
        } else {
            Value::Null
        };
        (200, vec![], json!({"data": data, "next": next}).to_string())
    })
}

/// A JSON-cursor API of `total` items that honours `?limit=` (capped at `cap`): the cursor is
/// the offset.
fn counting_api(total: u64, cap: u64) -> (Api, Seen) {
    api(move |_, uri| {
        let start: u64 = param(uri, "cursor").map_or(0, |c| c.parse().unwrap());
        let limit: u64 = param(uri, "limit").map_or(cap, |c| c.parse().unwrap());
        let end = (start + limit.min(cap)).min(total);
        let next = if end < total {
            json!(end.to_string())
        } else {
            Value::Null
        };
        let data: Vec<u64> = (start..end).collect();
        (200, vec![], json!({"data": data, "next": next}).to_string())
    })
}

fn nums(v: &[Value]) -> Vec<u64> {
    v.iter().map(|x| x.as_u64().expect("a number")).collect()
}

/// Every item of a walk and the error that ended it, bounded in time.
async fn walk<P: PageStrategy>(pager: &Paginate<P>) -> (Vec<Value>, Option<sturdy::core::Error>) {
    let mut out = Vec::new();
    let mut s = pager.items();
    let res = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(x) = s.next().await {
            match x {
                Ok(v) => out.push(v),
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

fn is_pagination(e: &sturdy::core::Error) -> bool {
    matches!(e.kind(), ErrorKind::Pagination)
}

// ---------------------------------------------------------------------------------------------
// Link headers: RFC 3986 reference resolution, delimiters inside `<...>`, other hosts

/// paginate.md: "`LinkHeader` (RFC 8288, relative links resolved)"; lib.rs: "resolved against
/// the page's URI". RFC 8288 resolves a target as RFC 3986 section 5 says: every normal and
/// abnormal example of RFC 3986 5.4 (base `http://a/b/c/d;p?q`) that stays on the origin is
/// requested exactly as the RFC resolves it; those that leave it (`g:h`, `//g`) are refused
/// without a request; the empty reference (the page itself) is a loop.
#[tokio::test]
async fn link_targets_resolve_as_rfc3986_section_5_4_says() {
    let base = "http://a/b/c/d;p?q";
    let same_origin: &[(&str, &str)] = &[
        ("g", "http://a/b/c/g"),
        ("./g", "http://a/b/c/g"),
        ("g/", "http://a/b/c/g/"),
        ("/g", "http://a/g"),
        ("?y", "http://a/b/c/d;p?y"),
        ("g?y", "http://a/b/c/g?y"),
        (";x", "http://a/b/c/;x"),
        ("g;x", "http://a/b/c/g;x"),
        (".", "http://a/b/c/"),
        ("./", "http://a/b/c/"),
        ("..", "http://a/b/"),
        ("../", "http://a/b/"),
        ("../g", "http://a/b/g"),
        ("../..", "http://a/"),
        ("../../", "http://a/"),
        ("../../g", "http://a/g"),
        ("../../../g", "http://a/g"),
        ("../../../../g", "http://a/g"),
        ("/./g", "http://a/g"),
        ("/../g", "http://a/g"),
        ("g.", "http://a/b/c/g."),
        (".g", "http://a/b/c/.g"),
        ("g..", "http://a/b/c/g.."),
        ("..g", "http://a/b/c/..g"),
        ("./../g", "http://a/b/g"),
        ("./g/.", "http://a/b/c/g/"),
        ("g/./h", "http://a/b/c/g/h"),
        ("g/../h", "http://a/b/c/h"),
        ("g;x=1/./y", "http://a/b/c/g;x=1/y"),
        ("g;x=1/../y", "http://a/b/c/y"),
        ("g?y/./x", "http://a/b/c/g?y/./x"),
        ("g?y/../x", "http://a/b/c/g?y/../x"),
        ("http://a/b/c/g", "http://a/b/c/g"),
    ];
    let mut wrong = Vec::new();
    for (reference, expected) in same_origin {
        let link = format!("<{reference}>; rel=\"next\"").into_bytes();
        let (svc, seen) = api(move |n, _| {
            if n == 0 {
                (200, vec![("link", link.clone())], "[1]".into())
            } else {
                (200, vec![], "[2]".into())
            }
        });
        let pager = Paginate::new(svc, base, LinkHeader::new("")).unwrap();
        let (items, err) = walk(&pager).await;
        let uris = seen.uris();
        if uris.get(1).map(String::as_str) != Some(*expected) || err.is_some() || items.len() != 2 {
            wrong.push(format!(
                "{reference:?}: expected {expected}, requested {:?}, error {:?}",
                uris.get(1),
                err.map(|e| e.to_string())
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    for reference in [
        "g:h",
        "//g",
        "//g/x?y",
        "https://a/b/c/g",
        "http://a:8080/g",
        "",
    ] {
        let link = format!("<{reference}>; rel=\"next\"").into_bytes();
        let (svc, seen) = api(move |n, _| {
            if n == 0 {
                (200, vec![("link", link.clone())], "[1]".into())
            } else {
                (200, vec![], "[2]".into())
            }
        });
        let pager = Paginate::new(svc, base, LinkHeader::new("")).unwrap();
        let (items, err) = walk(&pager).await;
        assert_eq!(items, vec![json!(1)], "{reference:?}");
        let err = err.unwrap_or_else(|| panic!("{reference:?} was followed: {:?}", seen.uris()));
        assert!(is_pagination(&err), "{reference:?}: {err}");
        assert_eq!(seen.len(), 1, "{reference:?}: {:?}", seen.uris());
    }
}

/// lib.rs: relative links are "resolved against the page's URI": the page's, not the first
/// page's. A chain of relative links walks down and up a tree.
#[tokio::test]
async fn relative_links_resolve_against_the_current_page_not_the_first() {
    // /r/p1 -> "a/p2" (= /r/a/p2) -> "../b/p3" (= /r/b/p3) -> "?x=1" (= /r/b/p3?x=1) -> end
    let (svc, seen) = api(|_, uri| {
        let (link, item) = match uri {
            "http://api.example.com/r/p1" => (Some("<a/p2>; rel=next"), 1),
            "http://api.example.com/r/a/p2" => (Some("<../b/p3>; rel=next"), 2),
            "http://api.example.com/r/b/p3" => (Some("<?x=1>; rel=next"), 3),
            "http://api.example.com/r/b/p3?x=1" => (None, 4),
            _ => (None, 99),
        };
        let headers = link
            .map(|l| ("link", l.as_bytes().to_vec()))
            .into_iter()
            .collect();
        (200, headers, format!("[{item}]"))
    });
    let pager = Paginate::new(svc, "http://api.example.com/r/p1", LinkHeader::new("")).unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}: {:?}", seen.uris());
    assert_eq!(
        items,
        vec![json!(1), json!(2), json!(3), json!(4)],
        "{:?}",
        seen.uris()
    );
}

/// RFC 8288: the target is everything between `<` and `>`; a `,` or `;` there is part of the
/// URI, not a delimiter. The next page is requested with exactly that URI.
#[tokio::test]
async fn commas_and_semicolons_inside_the_angle_brackets_are_part_of_the_uri() {
    let link = b"<http://api.example.com/v1/items?a=1,2;b=3&page=2>; rel=\"next\", </v1/items?page=9>; rel=\"last\"".to_vec();
    let (svc, seen) = api(move |n, _| {
        if n == 0 {
            (200, vec![("link", link.clone())], "[1]".into())
        } else {
            (200, vec![], "[2]".into())
        }
    });
    let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(items, vec![json!(1), json!(2)]);
    assert_eq!(
        seen.uris()[1],
        "http://api.example.com/v1/items?a=1,2;b=3&page=2"
    );
}

/// paginate.md: "A next link to another origin is refused unless
/// `.with_foreign_origin_allowed(true)`". Next links that look like the first page's host but
/// are not (`api.example.com@evil`, `api.example.com.evil`, a network-path reference, a host
/// with a port to another service) never reach another authority.
#[tokio::test]
async fn look_alike_next_links_never_reach_another_authority() {
    let tricks = [
        "http://api.example.com@evil.example/v1/items?page=2",
        "http://api.example.com:80@evil.example/v1/items?page=2",
        "http://api.example.com.evil.example/v1/items?page=2",
        "//evil.example/v1/items?page=2",
        "http://evil.example%2F@api.example.com/v1/items?page=2",
        "http://api.example.com:81/v1/items?page=2",
        "https://api.example.com/v1/items?page=2",
        "ftp://api.example.com/v1/items?page=2",
        "http://[::1]/v1/items?page=2",
        "http://127.0.0.1/v1/items?page=2",
        "http:evil.example/v1/items?page=2",
    ];
    for trick in tricks {
        let link = format!("<{trick}>; rel=next").into_bytes();
        let (svc, seen) = api(move |n, _| {
            if n == 0 {
                (200, vec![("link", link.clone())], "[1]".into())
            } else {
                (200, vec![], "[2]".into())
            }
        });
        let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
        let (_items, _err) = walk(&pager).await;
        for uri in seen.uris() {
            let u: http::Uri = uri.parse().unwrap();
            assert_eq!(
                (u.scheme_str(), u.host(), u.port_u16()),
                (Some("http"), Some("api.example.com"), None),
                "{trick}: requested {uri}"
            );
        }
    }
}

/// paginate.md: "the cost must stay linear" is the brief's; the docs say a guard ends a bad walk
/// with an error. A Link header of 10,000 entries whose last is `next`, and one of 64 KiB of a
/// single quoted parameter full of `,` `;` `<` `>`, parse in time comparable to a 1 KiB one.
#[tokio::test]
async fn huge_link_headers_with_delimiters_in_quotes_cost_linear_time() {
    async fn time_of(link: Vec<u8>) -> (Duration, Vec<String>) {
        let (svc, seen) = api(move |n, _| {
            if n == 0 {
                (200, vec![("link", link.clone())], "[1]".into())
            } else {
                (200, vec![], "[2]".into())
            }
        });
        let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
        let t = tokio::time::Instant::now();
        let _ = walk(&pager).await;
        (t.elapsed(), seen.uris())
    }
    let next = "</v1/items?page=2>; rel=\"next\"";
    let small = format!("{}{next}", "</x>; rel=\"item\", ".repeat(60));
    let (t_small, uris) = time_of(small.into_bytes()).await;
    assert_eq!(uris.len(), 2);
    let many = format!("{}{next}", "</x>; rel=\"item\", ".repeat(10_000));
    let (t_many, uris) = time_of(many.into_bytes()).await;
    assert_eq!(uris.len(), 2, "the next link after 10,000 entries");
    let quoted = format!(
        "</y>; title=\"{}\", {next}",
        "a,b;c<d>e=\\\"".repeat(65_536 / 13)
    );
    let (t_quoted, uris) = time_of(quoted.into_bytes()).await;
    assert_eq!(uris.len(), 2, "the next link after a 64 KiB quoted string");
    let bound = t_small * 400 + Duration::from_millis(300);
    assert!(
        t_many < bound,
        "10,000 entries: {t_many:?} vs 1 KiB {t_small:?}"
    );
    assert!(
        t_quoted < bound,
        "64 KiB quoted: {t_quoted:?} vs 1 KiB {t_small:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// cursors of the server: never changing, empty, empty pages

/// paginate.md: "When a page's next cursor leads to a URI already fetched in this walk ... the
/// page is yielded and the walk ends with a loop error": a server cursor that never changes is
/// read twice (no cursor, then the cursor) and then ends; no item twice.
#[tokio::test]
async fn a_server_cursor_that_never_changes_ends_with_a_loop_error() {
    let (svc, seen) = api(|n, _| {
        (
            200,
            vec![],
            json!({"data": [n], "next": "same"}).to_string(),
        )
    });
    let pager = Paginate::new(svc, BASE, JsonCursor::new("/data", "/next")).unwrap();
    let (items, err) = walk(&pager).await;
    assert_eq!(items, vec![json!(0), json!(1)], "{:?}", seen.uris());
    let err = err.expect("a loop error");
    assert!(is_pagination(&err), "{err}");
    assert_eq!(seen.len(), 2);

    // The same through page(): the call reads both pages, then fails as a whole.
    let r = pager.page(None, 10).await;
    assert!(r.is_err(), "{r:?}");
    // With a limit that stops on the second page, the cursor it returns leads back: refused.
    let first = pager.page(None, 1).await.unwrap();
    let second = pager.page(first.next_cursor.as_deref(), 1).await.unwrap();
    assert!(second.has_more);
    let before = seen.len();
    let third = pager.page(second.next_cursor.as_deref(), 1).await;
    assert!(third.is_err(), "{third:?}");
    assert_eq!(seen.len(), before, "no request for the page it came from");
}

/// An empty server cursor (`"next": ""`) must neither hang the walk nor yield an item twice.
#[tokio::test]
async fn an_empty_server_cursor_neither_hangs_nor_repeats() {
    let (svc, seen) = api(|n, _| (200, vec![], json!({"data": [n], "next": ""}).to_string()));
    let pager = Paginate::new(svc, BASE, JsonCursor::new("/data", "/next")).unwrap();
    let (items, _err) = walk(&pager).await;
    let mut dedup = items.clone();
    dedup.dedup();
    assert_eq!(items, dedup);
    assert!(seen.len() <= 2, "{:?}", seen.uris());
    let r = tokio::time::timeout(Duration::from_secs(5), pager.page(None, 50))
        .await
        .expect("page() hangs");
    if let Ok(p) = r {
        assert!(p.items.len() <= 2, "{p:?}");
    }
}

/// "an empty page followed by more": empty pages with a next cursor are skipped, in walks and in
/// `page()`, which reads on until it has its items; positions stay exact across calls.
#[tokio::test]
async fn empty_pages_between_full_ones_are_read_through() {
    let pages = vec![vec![], vec![], vec![1, 2], vec![], vec![], vec![3], vec![]];
    let (svc, seen) = cursor_pages(pages);
    let pager = Paginate::builder(svc, BASE, JsonCursor::new("/data", "/next"))
        .with_cursor_key(KEY)
        .build()
        .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(nums(&items), vec![1, 2, 3]);
    assert_eq!(seen.len(), 7);

    let all = pager.page(None, 10).await.unwrap();
    assert_eq!(nums(&all.items), vec![1, 2, 3]);
    assert!(!all.has_more, "{all:?}");
    assert_eq!(all.next_cursor, None);

    let mut got = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let p = pager.page(cursor.as_deref(), 1).await.unwrap();
        got.extend(nums(&p.items));
        cursor = p.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(got, vec![1, 2, 3]);
}

/// lib.rs: `page()` "Fetches only the pages needed". A server whose pages hold exactly the limit
/// is asked for one page per call.
#[tokio::test]
async fn a_page_call_fetches_no_page_it_does_not_need() {
    let (svc, seen) = counting_api(30, 100);
    let pager = Paginate::new(svc, BASE, JsonCursor::new("/data", "/next")).unwrap();
    let p1 = pager.page(None, 10).await.unwrap();
    assert_eq!(seen.len(), 1, "{:?}", seen.uris());
    let p2 = pager.page(p1.next_cursor.as_deref(), 10).await.unwrap();
    assert_eq!(seen.len(), 2, "{:?}", seen.uris());
    assert_eq!(nums(&p2.items), (10..20).collect::<Vec<_>>());
    let p3 = pager.page(p2.next_cursor.as_deref(), 10).await.unwrap();
    assert_eq!(nums(&p3.items), (20..30).collect::<Vec<_>>());
    assert!(!p3.has_more);
    assert_eq!(p3.next_cursor, None);
    assert_eq!(seen.len(), 3);
}

/// lib.rs: `items_as`: "Every item, deserialized into `T`". An item that is not a `T` is an
/// error that names the item; the items around it are neither lost nor repeated (no panic, no
/// hang), so `try_collect` stops at it and a caller that skips it reads the rest.
#[tokio::test]
async fn items_as_with_an_item_of_another_shape_ends_with_an_error() {
    #[derive(serde::Deserialize, Debug)]
    struct Row {
        id: u64,
    }
    let (svc, _seen) = api(|_, uri| {
        let body = if param(uri, "cursor").is_none() {
            json!({"data": [{"id": 1}, {"id": "two"}, {"id": 3}], "next": "1"})
        } else {
            json!({"data": [{"id": 4}], "next": null})
        };
        (200, vec![], body.to_string())
    });
    let pager = Paginate::new(svc, BASE, JsonCursor::new("/data", "/next")).unwrap();
    let mut s = pager.items_as::<Row>();
    let out = tokio::time::timeout(Duration::from_secs(5), async {
        let mut out = Vec::new();
        while let Some(x) = s.next().await {
            out.push(x.map_err(|e| e.to_string()));
        }
        out
    })
    .await
    .unwrap();
    assert_eq!(out.len(), 4, "{out:?}");
    assert!(out[1].as_ref().unwrap_err().contains("item 2"), "{out:?}");
    let ok: Vec<u64> = out
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.id)
        .collect();
    assert_eq!(ok, [1, 3, 4]);
}

// ---------------------------------------------------------------------------------------------
// page() cursors: edited, truncated, padded, huge, foreign, across processes

/// paginate.md: "A forged, edited or truncated cursor ... is refused before any request is
/// sent." Every single-character edit of a real cursor (every position, every base64url
/// character and `=`, `+`, `/`), every truncation, and padding or whitespace added, is refused
/// with kind `Pagination` and no request.
#[tokio::test]
async fn every_single_character_edit_of_a_cursor_is_refused() {
    let (svc, seen) = counting_api(50, 100);
    let pager = Paginate::builder(svc, BASE, JsonCursor::new("/data", "/next"))
        .with_cursor_key(KEY)
        .build()
        .unwrap();
    let p = pager.page(None, 7).await.unwrap();
    let cursor = p.next_cursor.unwrap();
    let alphabet: Vec<char> = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/"
        .chars()
        .collect();
    let before = seen.len();
    let mut accepted = Vec::new();
    let chars: Vec<char> = cursor.chars().collect();
    let mut edits = Vec::new();
    for i in 0..chars.len() {
        for &c in &alphabet {
            if chars[i] != c {
                let mut e = chars.clone();
                e[i] = c;
                edits.push(e.into_iter().collect::<String>());
            }
        }
        edits.push(chars[..i].iter().collect());
        let mut removed = chars.clone();
        removed.remove(i);
        edits.push(removed.into_iter().collect());
    }
    for extra in ["=", "==", "===", " ", "\n", "\t", "A", "AA", "AAAA"] {
        edits.push(format!("{cursor}{extra}"));
        edits.push(format!("{extra}{cursor}"));
    }
    edits.push(cursor.to_uppercase());
    edits.push(format!("{cursor}{cursor}"));
    for e in edits {
        match pager.page(Some(&e), 7).await {
            Ok(p) => accepted.push(format!("{e:?} -> {:?}", nums(&p.items))),
            Err(err) => assert!(is_pagination(&err), "{e:?}: {err}"),
        }
    }
    assert!(
        accepted.is_empty(),
        "{} edited cursors accepted:\n{}",
        accepted.len(),
        accepted.join("\n")
    );
    assert_eq!(
        seen.len(),
        before,
        "a request was sent for an edited cursor"
    );
    // The real one still works.
    let next = pager.page(Some(&cursor), 7).await.unwrap();
    assert_eq!(nums(&next.items), (7..14).collect::<Vec<_>>());
}

/// paginate.md: "A cursor is at most 16 KiB (`MAX_CURSOR_LEN`)". Hostile cursors (16 KiB + 1,
/// 64 KiB, 1 MiB, non-ASCII, NUL, control characters) are refused with kind `Pagination`, before
/// any request, and the error is short: it does not echo the cursor back to the model.
#[tokio::test]
async fn hostile_cursors_get_a_short_clear_error_and_no_request() {
    let (svc, seen) = counting_api(50, 100);
    let pager = Paginate::builder(svc, BASE, JsonCursor::new("/data", "/next"))
        .with_cursor_key(KEY)
        .build()
        .unwrap();
    let real = pager.page(None, 3).await.unwrap().next_cursor.unwrap();
    let before = seen.len();
    let hostile = vec![
        "A".repeat(MAX_CURSOR_LEN + 1),
        "A".repeat(64 * 1024),
        "A".repeat(1 << 20),
        format!("{real}{}", "A".repeat(MAX_CURSOR_LEN)),
        "é".repeat(100),
        "\u{0}".repeat(40),
        "\u{7f}\u{1b}[31m".repeat(30),
        "🦀".repeat(5000),
        "%41%41%41%41".into(),
        "null".into(),
        "{}".into(),
        "eyJjIjoiOTk5In0".into(),
    ];
    for c in hostile {
        let err = pager.page(Some(&c), 3).await.expect_err("accepted");
        assert!(is_pagination(&err), "{err}");
        let msg = err.to_string();
        assert!(msg.to_lowercase().contains("cursor"), "{msg}");
        assert!(
            msg.len() < 600,
            "a {} byte error for a {} byte cursor",
            msg.len(),
            c.len()
        );
        let summary = ErrorSummary::of(&err);
        assert_eq!(summary.kind, "pagination");
        assert!(!summary.retryable, "{summary:?}");
    }
    assert_eq!(seen.len(), before);
}

/// lib.rs: the cursor is signed "over the cursor and the pager's URI"; paginate.md: "one from
/// another endpoint, is refused". Same key, same strategy, another path or query: refused.
#[tokio::test]
async fn a_cursor_from_a_sibling_endpoint_with_the_same_key_is_refused() {
    let (svc, seen) = counting_api(50, 100);
    let a = Paginate::builder(svc.clone(), BASE, JsonCursor::new("/data", "/next"))
        .with_cursor_key(KEY)
        .build()
        .unwrap();
    let c = a.page(None, 5).await.unwrap().next_cursor.unwrap();
    for other in [
        "http://api.example.com/v1/items?archived=true",
        "http://api.example.com/v1/items/",
        "http://api.example.com/v2/items",
        "http://other.example.com/v1/items",
    ] {
        let b = Paginate::builder(svc.clone(), other, JsonCursor::new("/data", "/next"))
            .with_cursor_key(KEY)
            .build()
            .unwrap();
        let before = seen.len();
        let r = b.page(Some(&c), 5).await;
        assert!(r.is_err(), "{other}: {r:?}");
        assert_eq!(seen.len(), before, "{other}");
    }
}

/// An empty cursor string is not a cursor the pager returned (it returns `None` at the end, and
/// `None` is the start): `Some("")` is refused, not read as the first page.
#[tokio::test]
async fn an_empty_cursor_string_is_refused() {
    let (svc, seen) = counting_api(50, 100);
    let pager = Paginate::new(svc, BASE, JsonCursor::new("/data", "/next")).unwrap();
    let r = pager.page(Some(""), 5).await;
    assert!(r.is_err(), "Some(\"\") read as {r:?}");
    assert_eq!(seen.len(), 0);
}

/// The child half of `a_cursor_made_in_another_process_resumes_exactly`: mints a cursor with the
/// shared key and prints it. Does nothing unless `S73_CHILD_MINT` is set.
#[tokio::test]
async fn s73_child_mints_a_cursor() {
    if std::env::var_os("S73_CHILD_MINT").is_none() {
        return;
    }
    let (svc, _seen) = counting_api(50, 100);
    let pager = Paginate::builder(svc, BASE, JsonCursor::new("/data", "/next"))
        .with_cursor_key(KEY)
        .build()
        .unwrap();
    let p = pager.page(None, 7).await.unwrap();
    println!("S73CURSOR={}", p.next_cursor.unwrap());
    println!("S73ITEMS={}", serde_json::to_string(&p.items).unwrap());
}

/// agents.md: "`with_cursor_key` keeps them valid across restarts". A cursor minted by another
/// process (this test binary, run again) resumes exactly here with the same key, and is refused
/// by a pager with its own random key.
#[tokio::test]
async fn a_cursor_made_in_another_process_resumes_exactly() {
    let exe = std::env::current_exe().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(exe)
                .args([
                    "s73_paginate::s73_child_mints_a_cursor",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("S73_CHILD_MINT", "1")
                .output()
        }),
    )
    .await
    .expect("the child hangs")
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    let cursor = stdout
        .lines()
        .find_map(|l| l.split_once("S73CURSOR=").map(|(_, c)| c))
        .unwrap_or_else(|| panic!("no cursor: {stdout}"))
        .trim()
        .to_owned();
    let items: Vec<Value> = serde_json::from_str(
        stdout
            .lines()
            .find_map(|l| l.split_once("S73ITEMS=").map(|(_, c)| c))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(nums(&items), (0..7).collect::<Vec<_>>());

    let (svc, seen) = counting_api(50, 100);
    let pager = Paginate::builder(svc.clone(), BASE, JsonCursor::new("/data", "/next"))
        .with_cursor_key(KEY)
        .build()
        .unwrap();
    let p = pager.page(Some(&cursor), 7).await.unwrap();
    assert_eq!(nums(&p.items), (7..14).collect::<Vec<_>>());
    assert!(p.has_more);
    let stranger = Paginate::new(svc, BASE, JsonCursor::new("/data", "/next")).unwrap();
    let before = seen.len();
    assert!(stranger.page(Some(&cursor), 7).await.is_err());
    assert_eq!(seen.len(), before);
}

// ---------------------------------------------------------------------------------------------
// page() under Buffer and ConcurrencyLimit(1), dropped at seeded points

/// README: every layer "can sit under a `Buffer` or over a `ConcurrencyLimit`". `page()` calls
/// over `Buffer(ConcurrencyLimit(1, slow api))`, dropped at seeded points while a page is in
/// flight, leave no slot taken: a last call completes, and every completed call's items are
/// exact.
#[tokio::test(start_paused = true)]
async fn page_calls_dropped_at_seeded_points_under_a_buffered_limit_of_one() {
    let (inner, _seen) = counting_api(200, 100);
    let slow = service_fn(move |req: Request<Full<Bytes>>| {
        let inner = inner.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            inner.oneshot(req).await
        }
    });
    let limited = tower::limit::ConcurrencyLimit::new(slow, 1);
    let buffered = tower::buffer::Buffer::new(limited, 4);
    let pager = Paginate::builder(buffered, BASE, JsonCursor::new("/data", "/next"))
        .with_cursor_key(KEY)
        .with_page_size(5)
        .build()
        .unwrap();
    let mut rng = Rng(73);
    let mut cursor: Option<String> = None;
    let mut got: Vec<u64> = Vec::new();
    for _ in 0..60 {
        let limit = 1 + rng.below(12) as usize;
        let drop_after = Duration::from_millis(rng.below(40));
        // On a timeout the call is dropped mid-flight, and the same cursor is asked again.
        if let Ok(r) = tokio::time::timeout(drop_after, pager.page(cursor.as_deref(), limit)).await
        {
            let p = r.unwrap();
            got.extend(nums(&p.items));
            cursor = p.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
    }
    // Finish the walk without drops.
    while let Some(c) = cursor.clone() {
        let p = tokio::time::timeout(Duration::from_secs(5), pager.page(Some(&c), 50))
            .await
            .expect("a slot was leaked: the call hangs")
            .unwrap();
        got.extend(nums(&p.items));
        cursor = p.next_cursor;
    }
    if got.is_empty() || got[0] != 0 {
        // every early call was dropped before its first page; start over without drops
        got.clear();
        let p = pager.page(None, 10_000).await.unwrap();
        got.extend(nums(&p.items));
    }
    assert_eq!(got, (0..200).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// secrets in errors and in agent summaries

/// paginate.md and lib.rs: `Debug` of pages and origins never show userinfo or a query (a next
/// link "may carry credentials"). Every error a walk or a page() call can end with (bad JSON,
/// status, loop, foreign origin, oversized body, bound), over a first URI and next links that
/// carry credentials, keeps them out of `Display`, `Debug`, `ErrorSummary` and `tool_result`.
#[tokio::test]
async fn no_credential_reaches_an_error_or_an_agent_summary() {
    let first = "http://alice:hunter2pw@api.example.com/v1/items?token=SECRETQ1";
    let next_same = "http://bob:hunter3pw@api.example.com/v1/items?page=2&sig=SECRETQ2";
    let next_foreign = "https://carol:hunter4pw@evil.example/v1/items?sig=SECRETQ3";
    type Case = (&'static str, &'static str, u16, &'static str);
    // (what, next link of page 1, status of page 2, body of page 2)
    let cases: Vec<Case> = vec![
        ("bad json", next_same, 200, "not json {"),
        ("no array", next_same, 200, "{\"x\":1}"),
        ("status 500", next_same, 500, "boom"),
        ("status 404", next_same, 404, "gone"),
        ("loop", first, 200, "[2]"),
        ("foreign", next_foreign, 200, "[2]"),
        (
            "too big",
            next_same,
            200,
            "[2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2]",
        ),
    ];
    for (what, link, status, body) in cases {
        let link_h = format!("<{link}>; rel=\"next\"").into_bytes();
        let (svc, _seen) = api(move |_, uri| {
            if uri.contains("sig=") {
                (status, vec![], body.into())
            } else {
                (200, vec![("link", link_h.clone())], "[1]".into())
            }
        });
        let pager = Paginate::builder(svc, first, LinkHeader::new("").without_limit_param())
            .with_max_page_bytes(40)
            .build()
            .unwrap();
        let (_items, err) = walk(&pager).await;
        let err = err.unwrap_or_else(|| panic!("{what}: no error"));
        let via_page = pager.page(None, 10).await.expect_err(what);
        for e in [err, via_page] {
            let boxed: sturdy::core::BoxError = Box::new(e);
            let texts = [
                boxed.to_string(),
                format!("{boxed:?}"),
                serde_json::to_string(&ErrorSummary::of(&*boxed)).unwrap(),
                ErrorSummary::of(&*boxed).advice(),
                tool_result::<Value>(Err(boxed)).to_string(),
            ];
            for t in texts {
                for secret in ["hunter", "SECRETQ", "alice", "bob", "carol"] {
                    assert!(!t.contains(secret), "{what}: {secret} in {t}");
                }
            }
        }
    }
}

/// Same for the timeout guard (paused time): a stalled page behind a next link with a query
/// secret times out with kind `Timeout`, and the summary shows no secret.
#[tokio::test(start_paused = true)]
async fn a_timed_out_page_behind_a_secret_link_keeps_the_secret() {
    let svc = service_fn(|req: Request<Full<Bytes>>| async move {
        if req.uri().query().is_some_and(|q| q.contains("sig=")) {
            std::future::pending::<()>().await;
        }
        Ok::<_, Infallible>(
            Response::builder()
                .header(
                    "link",
                    "<http://u:pw-hunter5@api.example.com/v1/items?sig=SECRETQ5>; rel=next",
                )
                .body(Full::new(Bytes::from_static(b"[1]")))
                .unwrap(),
        )
    });
    let pager = Paginate::builder(svc, BASE, LinkHeader::new(""))
        .with_page_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let (_items, err) = walk(&pager).await;
    let err = err.expect("a timeout");
    assert!(matches!(err.kind(), ErrorKind::Timeout), "{err}");
    let boxed: sturdy::core::BoxError = Box::new(err);
    let s = ErrorSummary::of(&*boxed);
    assert_eq!(s.kind, "timeout");
    assert!(s.retryable);
    let shown = format!("{boxed} {boxed:?}");
    let all = format!("{shown} {}", tool_result::<Value>(Err(boxed)));
    assert!(
        !all.contains("SECRETQ5") && !all.contains("hunter5"),
        "{all}"
    );
}

// ---------------------------------------------------------------------------------------------
// VersionLayer

/// Tests that emit the version layer's warnings by the thousand run apart from the one that
/// captures them: `tracing`'s per-call-site interest cache races between threads.
static TRACING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Default)]
struct Notices(Arc<Mutex<Vec<Notice>>>);

impl Notices {
    fn all(&self) -> Vec<Notice> {
        self.0.lock().unwrap().clone()
    }
}

fn noted(layer: VersionLayer) -> (VersionLayer, Notices) {
    let n = Notices::default();
    let log = n.clone();
    (
        layer.on_notice(move |x: &Notice| log.0.lock().unwrap().push(x.clone())),
        n,
    )
}

/// Decodes `application/x-www-form-urlencoded` text.
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(h, 16).unwrap());
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

/// A service that records each request's URI and headers and answers with `headers`.
fn version_api(
    headers: Vec<(&'static str, &'static str)>,
) -> (
    impl Service<
            Request<()>,
            Response = Response<()>,
            Error = Infallible,
            Future = impl std::future::Future<Output = Result<Response<()>, Infallible>> + Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Arc<Mutex<Vec<(String, HeaderMap)>>>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let svc = service_fn(move |req: Request<()>| {
        log.lock()
            .unwrap()
            .push((req.uri().to_string(), req.headers().clone()));
        let mut b = Response::builder();
        for (k, v) in &headers {
            b = b.header(*k, *v);
        }
        let resp = b.body(()).unwrap();
        async move { Ok::<_, Infallible>(resp) }
    });
    (svc, seen)
}

/// version.md: "`::query(name, version)`, which cannot fail: both are form-encoded". A name and
/// a version full of reserved characters arrive as one parameter that form-decodes to exactly
/// them; the caller's other parameters are untouched; on origin-form URIs too.
#[tokio::test]
async fn the_query_pin_is_form_encoded_and_decodes_exactly() {
    let name = "api version&x=1";
    let version = "2024/06 01+β=#?%";
    let (svc, seen) = version_api(vec![]);
    let client = VersionLayer::query(name, version).layer(svc);
    for uri in [
        "http://api.example.com/v1/orders",
        "http://api.example.com/v1/orders?a=1&b=%2B+x",
        "http://api.example.com/v1/orders?",
        "/v1/orders",
        "/v1/orders?a=1",
    ] {
        client
            .clone()
            .oneshot(Request::get(uri).body(()).unwrap())
            .await
            .unwrap();
        let (sent, _) = seen.lock().unwrap().last().cloned().unwrap();
        let u: http::Uri = sent.parse().unwrap();
        let pairs = form_pairs(u.query().unwrap_or(""));
        let pinned: Vec<_> = pairs.iter().filter(|(k, _)| k == name).collect();
        assert_eq!(pinned.len(), 1, "{uri} -> {sent}");
        assert_eq!(pinned[0].1, version, "{uri} -> {sent}");
        assert!(u.path().ends_with("/v1/orders"), "{uri} -> {sent}");
        if uri.contains("a=1&b=%2B+x") {
            assert!(sent.contains("a=1&b=%2B+x"), "{sent}");
        }
    }
}

/// version.md: "pins the version on every request (a version the caller set is kept)", for the
/// query form: a caller's own `api-version` parameter is kept and not joined by a second one.
#[tokio::test]
async fn a_callers_own_query_version_is_kept_once() {
    let (svc, seen) = version_api(vec![]);
    let client = VersionLayer::query("api-version", "2024-06-01").layer(svc);
    for uri in [
        "http://api.example.com/v1/orders?api-version=2020-01-01",
        "http://api.example.com/v1/orders?a=1&api-version=2020-01-01&b=2",
    ] {
        client
            .clone()
            .oneshot(Request::get(uri).body(()).unwrap())
            .await
            .unwrap();
        let (sent, _) = seen.lock().unwrap().last().cloned().unwrap();
        let q = sent.split_once('?').unwrap().1;
        let versions: Vec<_> = form_pairs(q)
            .into_iter()
            .filter(|(k, _)| k == "api-version")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(versions, ["2020-01-01"], "{uri} -> {sent}");
    }
}

/// version.md: the header form keeps a version the caller set, whatever case the caller wrote
/// the name in, and adds exactly one otherwise.
#[tokio::test]
async fn a_callers_own_header_version_is_kept_once() {
    let (svc, seen) = version_api(vec![]);
    let client = VersionLayer::header("API-Version", "2024-06-01")
        .unwrap()
        .layer(svc);
    let req = Request::get("http://api.example.com/v1/orders")
        .header("api-version", "2020-01-01")
        .body(())
        .unwrap();
    client.clone().oneshot(req).await.unwrap();
    let req = Request::get("http://api.example.com/v1/orders")
        .body(())
        .unwrap();
    client.clone().oneshot(req).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let first: Vec<_> = seen[0].1.get_all("api-version").iter().collect();
    assert_eq!(first, ["2020-01-01"]);
    let second: Vec<_> = seen[1].1.get_all("api-version").iter().collect();
    assert_eq!(second, ["2024-06-01"]);
}

/// RFC 9110 5.6.7: a recipient must accept all three HTTP-date forms; version.md reads `Sunset`
/// "leniently" and `Deprecation` in its HTTP-date form. IMF-fixdate, RFC 850 and asctime name
/// the same instant.
#[tokio::test]
async fn sunset_and_deprecation_in_all_three_http_date_forms() {
    let want = UNIX_EPOCH + Duration::from_secs(784_111_777);
    for date in [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
    ] {
        let (svc, _seen) = version_api(vec![]);
        let svc = tower::util::MapResponse::new(svc, move |mut r: Response<()>| {
            r.headers_mut().insert("sunset", date.parse().unwrap());
            r.headers_mut().insert("deprecation", date.parse().unwrap());
            r
        });
        let (layer, notices) = noted(VersionLayer::header("api-version", "1").unwrap());
        layer
            .layer(svc)
            .oneshot(
                Request::get("http://api.example.com/v1/x")
                    .body(())
                    .unwrap(),
            )
            .await
            .unwrap();
        let n = notices.all();
        assert_eq!(n.len(), 1, "{date}");
        assert_eq!(n[0].sunset, Some(want), "sunset {date}");
        assert_eq!(n[0].deprecation, Some(Some(want)), "deprecation {date}");
    }
}

/// version.md: "reported once per endpoint". Fifty concurrent calls to one deprecated endpoint
/// on clones of the service report it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_report_an_endpoint_once() {
    let (svc, _seen) = version_api(vec![("deprecation", "@1688169599")]);
    let (layer, notices) = noted(VersionLayer::header("api-version", "1").unwrap());
    let client = layer.layer(svc);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let uri = format!("http://api.example.com/v1/orders?i={i}");
            c.oneshot(Request::get(uri).body(()).unwrap())
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .unwrap()
            .unwrap();
    }
    let n = notices.all();
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].endpoint, "GET /v1/orders");
    assert_eq!(
        n[0].deprecation,
        Some(Some(UNIX_EPOCH + Duration::from_secs(1_688_169_599)))
    );
}

/// A callback that panics for one endpoint must not break the layer for the others: later
/// calls still go through, and other endpoints are still reported.
#[tokio::test]
async fn a_panicking_notice_callback_does_not_poison_the_layer() {
    let (svc, _seen) = version_api(vec![("deprecation", "true")]);
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let layer = VersionLayer::header("api-version", "1")
        .unwrap()
        .on_notice(move |n: &Notice| {
            if n.endpoint.contains("boom") {
                panic!("a callback bug");
            }
            log.lock().unwrap().push(n.endpoint.clone());
        });
    let client = layer.layer(svc);
    let r = std::panic::AssertUnwindSafe(
        client.clone().oneshot(
            Request::get("http://api.example.com/boom")
                .body(())
                .unwrap(),
        ),
    )
    .catch_unwind()
    .await;
    assert!(r.is_err(), "the callback's panic went somewhere else");
    for path in ["/ok/1", "/ok/2"] {
        let r = std::panic::AssertUnwindSafe(
            client.clone().oneshot(
                Request::get(format!("http://api.example.com{path}"))
                    .body(())
                    .unwrap(),
            ),
        )
        .catch_unwind()
        .await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "{path}: the layer is broken after a callback panic"
        );
    }
    assert_eq!(*seen.lock().unwrap(), ["GET /ok/1", "GET /ok/2"]);
}

/// version.md: "An endpoint is the method and the path": the query (which may hold an API key)
/// is not part of the notice nor of the `tracing` warning.
#[tokio::test(flavor = "current_thread")]
async fn the_notice_and_warning_never_show_the_query() {
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
    let _serial = TRACING.lock().await;
    let cap = Capture::default();
    let writer = cap.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let _guard = tracing::subscriber::set_default(sub);
    let (svc, _seen) = version_api(vec![
        ("deprecation", "@1688169599"),
        ("sunset", "Wed, 01 Jan 2031 00:00:00 GMT"),
    ]);
    let (layer, notices) = noted(VersionLayer::header("api-version", "1").unwrap());
    let client = layer.layer(svc);
    // `tracing` caches per call site whether anyone listens; tests on other threads can race
    // that cache, so a fresh endpoint is tried until one warning is captured.
    let mut out = String::new();
    for i in 0..50 {
        client
            .clone()
            .oneshot(
                Request::get(format!(
                    "http://user:pw-hunter6@api.example.com/v1/orders/{i}?api_key=SECRETQ6"
                ))
                .body(())
                .unwrap(),
            )
            .await
            .unwrap();
        out = String::from_utf8_lossy(&cap.0.lock().unwrap()).into_owned();
        if !out.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let n = notices.all();
    assert_eq!(n[0].endpoint, "GET /v1/orders/0");
    assert!(out.contains("/v1/orders/"), "{out}");
    assert!(
        !out.contains("SECRETQ6") && !out.contains("hunter6"),
        "{out}"
    );
    // A far-future sunset is read exactly.
    let when = n[0].sunset.unwrap();
    assert_eq!(
        when.duration_since(UNIX_EPOCH).unwrap().as_secs(),
        1_924_992_000
    );
}

// ---------------------------------------------------------------------------------------------
// json-server 0.17 (a real peer): set STURDY_S73_JSON_SERVER_URL to its base URL, with a
// `posts` collection of ids 1..=23.

fn json_server_url() -> Option<String> {
    std::env::var("STURDY_S73_JSON_SERVER_URL")
        .ok()
        .map(|u| u.trim_end_matches('/').to_owned())
}

fn hyper_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

fn ids(v: &[Value]) -> Vec<u64> {
    v.iter().map(|x| x["id"].as_u64().unwrap()).collect()
}

/// paginate.md: `LinkHeader` over json-server's own `Link` (first, prev, next, last; absolute
/// URLs): every post once, in order, through the composed client with a version pin.
#[tokio::test]
async fn s73_json_server_link_walk_through_the_client() {
    let Some(base) = json_server_url() else {
        return;
    };
    let client = sturdy::ClientBuilder::new()
        .with_version(VersionLayer::header("api-version", "2024-06-01").unwrap())
        .build(hyper_client());
    let pager = Paginate::new(
        client,
        &format!("{base}/posts?_page=1&_limit=7"),
        LinkHeader::new(""),
    )
    .unwrap();
    let (items, err) = walk(&pager).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(ids(&items), (1..=23).collect::<Vec<_>>());
}

/// agents.md: bounded pages over json-server, each call from a fresh pager with the shared key
/// (a restart between tool calls): the posts come back once each, in order, for seeded limits.
#[tokio::test]
async fn s73_json_server_bounded_pages_resume_across_fresh_pagers() {
    let Some(base) = json_server_url() else {
        return;
    };
    let mut rng = Rng(7373);
    let mut cursor: Option<String> = None;
    let mut got = Vec::new();
    for _ in 0..40 {
        let pager = Paginate::builder(
            hyper_client(),
            &format!("{base}/posts?_page=1"),
            LinkHeader::new("").with_limit_param("_limit"),
        )
        .with_cursor_key(KEY)
        .build()
        .unwrap();
        let limit = 1 + rng.below(9) as usize;
        let p = tokio::time::timeout(Duration::from_secs(5), pager.page(cursor.as_deref(), limit))
            .await
            .unwrap()
            .unwrap();
        assert!(p.items.len() <= limit);
        // The serialised page is what a tool hands the model; it comes back as it went.
        let text = serde_json::to_string(&p).unwrap();
        let back: sturdy::paginate::BoundedPage = serde_json::from_str(&text).unwrap();
        assert_eq!(back, p);
        got.extend(ids(&p.items));
        cursor = p.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(got, (1..=23).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// errors mid-stream over a real socket, through ClientBuilder

/// What the hand-written server does with the first request for a URI.
#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    Status503,
    Status429,
    Reset,
    CutBody,
}

/// A JSON-cursor API of `total` items (cursor = offset, pages of `min(limit, 10)`) on a raw
/// HTTP/1.1 socket, answering the first request of each distinct URI with a seeded fault. Every
/// response carries a `Deprecation`. Records each request's `api-version` header values.
async fn fault_server(total: u64, seed: u64) -> (String, Arc<Mutex<Vec<(String, Vec<String>)>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen_uris = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
    let rng = Arc::new(Mutex::new(Rng(seed)));
    let log2 = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let log = log2.clone();
            let seen_uris = seen_uris.clone();
            let rng = rng.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).into_owned();
                let target = head.split(' ').nth(1).unwrap_or("/").to_owned();
                let versions: Vec<String> = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .filter(|(k, _)| k.eq_ignore_ascii_case("api-version"))
                    .map(|(_, v)| v.trim().to_owned())
                    .collect();
                log.lock().unwrap().push((target.clone(), versions));
                let fresh = seen_uris.lock().unwrap().insert(target.clone());
                let fault = if fresh {
                    match rng.lock().unwrap().below(5) {
                        0 => Fault::Status503,
                        1 => Fault::Status429,
                        2 => Fault::Reset,
                        3 => Fault::CutBody,
                        _ => Fault::None,
                    }
                } else {
                    Fault::None
                };
                let q = target.split_once('?').map_or("", |(_, q)| q).to_owned();
                let start: u64 =
                    param(&format!("?{q}"), "cursor").map_or(0, |c| c.parse().unwrap());
                let limit: u64 =
                    param(&format!("?{q}"), "limit").map_or(10, |c| c.parse().unwrap());
                let end = (start + limit.min(10)).min(total);
                let next = if end < total {
                    json!(end.to_string())
                } else {
                    Value::Null
                };
                let data: Vec<u64> = (start..end).collect();
                let body = json!({"data": data, "next": next}).to_string();
                let common = "deprecation: @1688169599\r\nconnection: close\r\n";
                let resp = match fault {
                    Fault::Reset => {
                        #[allow(deprecated)] // linger 0: a reset, at once
                        let _ = sock.set_linger(Some(Duration::ZERO));
                        drop(sock);
                        return;
                    }
                    Fault::Status503 => format!(
                        "HTTP/1.1 503 Service Unavailable\r\n{common}content-length: 4\r\n\r\nbusy"
                    ),
                    Fault::Status429 => format!(
                        "HTTP/1.1 429 Too Many Requests\r\nretry-after: 0\r\n{common}content-length: 4\r\n\r\nslow"
                    ),
                    Fault::CutBody => format!(
                        "HTTP/1.1 200 OK\r\n{common}content-length: {}\r\n\r\n{}",
                        body.len(),
                        &body[..body.len() / 2]
                    ),
                    Fault::None => format!(
                        "HTTP/1.1 200 OK\r\n{common}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    ),
                };
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/items"), log)
}

/// agents.md: a tool call that fails says whether trying again can help; paginate.md: "A
/// `page()` call returns all its items or fails as a whole". Bounded pages through the composed
/// client (retries, version pin) over a server that answers every URI's first request with a
/// seeded 503, 429, reset or cut body: a failed call is retried with the same cursor, and every
/// item arrives exactly once, in order; every request carries the version exactly once; the
/// deprecation is reported once.
#[tokio::test]
async fn bounded_pages_through_the_client_over_faults_lose_and_repeat_nothing() {
    for seed in [1u64, 2, 3] {
        let (url, log) = fault_server(57, seed).await;
        let (version, notices) = noted(VersionLayer::header("api-version", "2024-06-01").unwrap());
        let client = sturdy::ClientBuilder::new()
            .with_retry(
                sturdy::retry::RetryLayer::new()
                    .with_max_attempts(4)
                    .with_backoff(
                        sturdy::retry::Backoff::exponential(
                            Duration::from_millis(1),
                            Duration::from_millis(5),
                        )
                        .unwrap(),
                    )
                    .with_seed(seed),
            )
            .without_circuit_breaker()
            .with_version(version)
            .build(hyper_client());
        let pager = Paginate::builder(client, &url, JsonCursor::new("/data", "/next"))
            .with_cursor_key(KEY)
            .with_page_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut rng = Rng(seed * 31);
        let mut cursor: Option<String> = None;
        let mut got = Vec::new();
        let mut failures = Vec::new();
        for _ in 0..200 {
            let limit = 1 + rng.below(13) as usize;
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                pager.page(cursor.as_deref(), limit),
            )
            .await
            .expect("a page call hangs");
            match r {
                Ok(p) => {
                    assert!(p.items.len() <= limit);
                    got.extend(nums(&p.items));
                    cursor = p.next_cursor;
                    if cursor.is_none() {
                        break;
                    }
                }
                Err(e) => {
                    let s = ErrorSummary::of(&e);
                    assert!(
                        s.retryable,
                        "seed {seed}: {e} summarised as not retryable: {s:?}"
                    );
                    failures.push(e.to_string());
                }
            }
        }
        assert_eq!(
            got,
            (0..57).collect::<Vec<_>>(),
            "seed {seed}; failures {failures:?}"
        );
        let log = log.lock().unwrap().clone();
        for (target, versions) in &log {
            assert_eq!(versions, &["2024-06-01"], "seed {seed}: {target}");
        }
        let n = notices.all();
        assert_eq!(n.len(), 1, "seed {seed}: {n:?}");
        assert_eq!(n[0].endpoint, "GET /items");
    }
}

// ---------------------------------------------------------------------------------------------
// hostile server answers: shrunk pages under a cursor, odd next cursors, redirects

/// paginate.md: the cursor "resumes exactly after the last item returned, even inside a server
/// page". When the server's page has shrunk since (rows deleted), resuming past its end must not
/// panic or hang: the call returns what follows (or nothing) and ends cleanly.
#[tokio::test]
async fn resuming_inside_a_page_that_has_since_shrunk_never_panics() {
    for (after, with_next) in [(2usize, true), (0, true), (2, false), (0, false), (5, true)] {
        let shrunk = Arc::new(AtomicUsize::new(0));
        let flag = shrunk.clone();
        let (svc, seen) = api(move |_, uri| {
            let second = param(uri, "cursor").is_some();
            let body = if second {
                json!({"data": [100, 101], "next": null})
            } else if flag.load(Ordering::SeqCst) == 0 {
                json!({"data": (0..10).collect::<Vec<_>>(), "next": "p2"})
            } else {
                let next = if with_next { json!("p2") } else { Value::Null };
                json!({"data": (0..after as u64).collect::<Vec<_>>(), "next": next})
            };
            (200, vec![], body.to_string())
        });
        let pager = Paginate::builder(svc, BASE, JsonCursor::new("/data", "/next"))
            .with_page_size(10)
            .build()
            .unwrap();
        let p = pager.page(None, 4).await.unwrap();
        assert_eq!(nums(&p.items), [0, 1, 2, 3]);
        shrunk.store(1, Ordering::SeqCst);
        let r = std::panic::AssertUnwindSafe(tokio::time::timeout(
            Duration::from_secs(5),
            pager.page(p.next_cursor.as_deref(), 4),
        ))
        .catch_unwind()
        .await;
        let r = r
            .unwrap_or_else(|_| panic!("page() panicked: page shrunk to {after}, next {with_next}"))
            .expect("page() hangs");
        match r {
            Ok(q) => {
                let got = nums(&q.items);
                if with_next {
                    assert!(
                        got.iter()
                            .all(|x| *x >= 100 || (*x >= 4 && *x < after as u64)),
                        "{got:?}"
                    );
                } else {
                    assert!(got.iter().all(|x| *x >= 4), "{got:?}");
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        assert!(seen.len() <= 4, "{:?}", seen.uris());
    }
}

/// paginate.md: a page "that is not the expected JSON is named by its number". A next cursor
/// that is not a string (a number, a boolean, an object, an array) must not end the walk
/// silently with items unread: it is followed (as its text) or the walk ends with an error.
#[tokio::test]
async fn a_next_cursor_that_is_not_a_string_is_never_a_silent_end() {
    for next in [
        json!(2),
        json!(2.5),
        json!(true),
        json!({"c": 2}),
        json!(["2"]),
        json!(false),
    ] {
        let n2 = next.clone();
        let (svc, seen) = api(move |_, uri| {
            let body = if param(uri, "cursor").is_some() {
                json!({"data": [2], "next": null})
            } else {
                json!({"data": [1], "next": n2})
            };
            (200, vec![], body.to_string())
        });
        let pager = Paginate::new(svc, BASE, JsonCursor::new("/data", "/next")).unwrap();
        let (items, err) = walk(&pager).await;
        assert!(
            err.is_some() || items.len() == 2,
            "next {next}: the walk ended without error after {items:?} ({:?})",
            seen.uris()
        );
        if let Some(e) = err {
            assert!(
                e.to_string().contains('1') || e.to_string().contains("page"),
                "{e}"
            );
        }
    }
}

/// lib.rs (`RawPage::status`): "always 2xx here; other statuses stop the walk earlier". A 3xx
/// page (the hyper client does not follow redirects) is not read as a page of items and is not
/// followed to its `Location`; a 204 is not a page of items either.
#[tokio::test]
async fn a_redirect_or_informational_status_is_not_a_page_of_items() {
    for status in [301u16, 302, 303, 307, 308, 304, 300] {
        let (svc, seen) = api(move |n, _| {
            if n == 0 {
                (
                    status,
                    vec![("location", b"http://evil.example/steal".to_vec())],
                    "[1,2,3]".into(),
                )
            } else {
                (200, vec![], "[9]".into())
            }
        });
        let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
        let (items, err) = walk(&pager).await;
        assert!(
            items.is_empty(),
            "{status}: items {items:?} read from a {status}"
        );
        let err = err.unwrap_or_else(|| panic!("{status}: no error"));
        assert!(!err.to_string().is_empty());
        assert_eq!(seen.len(), 1, "{status}: {:?}", seen.uris());
    }
}

// ---------------------------------------------------------------------------------------------
// more VersionLayer words

/// version.md: "the layer remembers 10,000 of them, and past that starts afresh, so a new
/// deprecation is never missed". 10,001 distinct endpoints give 10,001 notices; each repeated
/// at once is not reported again.
#[tokio::test]
async fn ten_thousand_and_one_endpoints_are_each_reported() {
    let _serial = TRACING.lock().await;
    let (svc, _seen) = version_api(vec![("sunset", "Wed, 01 Jan 2031 00:00:00 GMT")]);
    let (layer, notices) = noted(VersionLayer::header("api-version", "1").unwrap());
    let mut client = layer.layer(svc);
    for i in 0..10_001 {
        for _ in 0..2 {
            client
                .ready()
                .await
                .unwrap()
                .call(
                    Request::get(format!("http://api.example.com/v1/orders/{i}"))
                        .body(())
                        .unwrap(),
                )
                .await
                .unwrap();
        }
    }
    let n = notices.all();
    assert_eq!(n.len(), 10_001);
    assert_eq!(n.last().unwrap().endpoint, "GET /v1/orders/10000");
}

/// version.md: `VersionLayer::header(..)` is "a `Result`: the name and value must be valid in a
/// header". Invalid names and values are errors (no panic); valid odd ones are sent as given.
#[tokio::test]
async fn header_pin_validation_refuses_what_a_header_cannot_hold() {
    for (name, value) in [
        ("api version", "1"),
        ("", "1"),
        ("api:version", "1"),
        ("api-version", "a\r\nx-evil: 1"),
        ("api-version", "a\nb"),
        ("api-version", "a\u{0}b"),
        ("api-version\r\n", "1"),
    ] {
        assert!(
            VersionLayer::header(name, value).is_err(),
            "{name:?}: {value:?} accepted"
        );
    }
    let (svc, seen) = version_api(vec![]);
    let client = VersionLayer::header("X-GitHub-Api-Version", "2022-11-28 beta;q=1")
        .unwrap()
        .layer(svc);
    client
        .oneshot(Request::get("http://api.example.com/").body(()).unwrap())
        .await
        .unwrap();
    let h = seen.lock().unwrap()[0].1.clone();
    assert_eq!(h["x-github-api-version"], "2022-11-28 beta;q=1");
}

/// A Link header that is not UTF-8 (obs-text bytes) in one field line, with the next link in
/// another, never panics or hangs; the walk either follows the valid next link or ends with an
/// error, and never requests anything off the origin.
#[tokio::test]
async fn a_link_header_with_non_utf8_bytes_never_panics() {
    let (svc, seen) = api(|n, _| {
        if n == 0 {
            (
                200,
                vec![
                    ("link", b"</v1/items?x=\xff\xfe>; rel=\"next\"".to_vec()),
                    ("link", b"</v1/items?page=2>; rel=\"next\"".to_vec()),
                ],
                "[1]".into(),
            )
        } else {
            (
                200,
                vec![("link", b"<\xc3\x28>; rel=\xa0next".to_vec())],
                "[2]".into(),
            )
        }
    });
    let pager = Paginate::new(svc, BASE, LinkHeader::new("")).unwrap();
    let (items, _err) = walk(&pager).await;
    assert!(items.len() <= 2, "{items:?}");
    for uri in seen.uris() {
        assert!(uri.starts_with("http://api.example.com/v1/items"), "{uri}");
    }
}

/// version.md: `Sunset` is an HTTP date "read leniently". Common near-misses of IMF-fixdate
/// (one-digit day, lower case, `UTC`, extra spaces) are read as the same instant, or ignored;
/// never a wrong date.
#[tokio::test]
async fn lenient_sunset_dates_are_right_or_ignored() {
    let want = UNIX_EPOCH + Duration::from_secs(784_111_777);
    for date in [
        "Sun, 6 Nov 1994 08:49:37 GMT",
        "sun, 06 nov 1994 08:49:37 gmt",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun,  06 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 08:49:37 +0000",
        "Mon, 06 Nov 1994 08:49:37 GMT",
        "1994-11-06T08:49:37Z",
        "Sun, 06 Nov 1994 8:49:37 GMT",
    ] {
        let (svc, _seen) = version_api(vec![]);
        let svc = tower::util::MapResponse::new(svc, move |mut r: Response<()>| {
            r.headers_mut().insert("sunset", date.parse().unwrap());
            r
        });
        let (layer, notices) = noted(VersionLayer::header("api-version", "1").unwrap());
        layer
            .layer(svc)
            .oneshot(
                Request::get("http://api.example.com/v1/x")
                    .body(())
                    .unwrap(),
            )
            .await
            .unwrap();
        for n in notices.all() {
            assert_eq!(n.sunset, Some(want), "{date:?} read as {:?}", n.sunset);
        }
    }
}
