//! Review of the redaction of URIs and cursors in messages and `Debug` (everything up to the
//! last `@` and the query hidden), and of totals read before the items are moved out of a page.

use crate::support;
use support::{api, page};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use sturdy_paginate::{JsonCursor, LinkHeader, OffsetLimit, PageNumber, PageStrategy, Paginate};
use sturdy_paginate::{Parsed, RawPage};

const PW: &str = "hunter2pw";
const KEY: &str = "SECRETKEY9";

fn raw(uri: &str, body: &Value) -> RawPage {
    RawPage {
        number: 1,
        uri: uri.parse().unwrap(),
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        body: Bytes::from(serde_json::to_vec(body).unwrap()),
    }
}

fn clean(what: &str, shown: &str) {
    assert!(!shown.contains(PW), "{what}: {shown}");
    assert!(!shown.contains(KEY), "{what}: {shown}");
}

// ---------------------------------------------------------------- redaction

/// A query that holds an `@` (an e-mail address, a `from=@me` filter) before the secret: the
/// last `@` is in the query, so what is cut as "userinfo" is the host and the query's start,
/// and the rest of the query, secret included, is shown.
#[test]
fn a_raw_pages_debug_hides_a_query_secret_after_an_at_sign() {
    let uri = format!("https://api.example.com/orders?email=ann@example.org&api_key={KEY}");
    let r = raw(&uri, &json!([]));
    clean("RawPage", &format!("{r:?}"));
}

#[test]
fn debug_hides_a_query_secret_after_an_at_sign() {
    let (svc, _) = api(|_| page("[]", None));
    let uri = format!("https://api.example.com/orders?email=ann@example.org&api_key={KEY}");
    let b = Paginate::builder(svc, &uri, JsonCursor::new("/data", "/next"));
    clean("builder", &format!("{b:?}"));
    let p = b.build().unwrap();
    clean("pager", &format!("{p:?}"));
}

/// A relative first URI is refused; its message quotes the URI through the same redaction.
#[test]
fn a_relative_first_uri_error_hides_its_query() {
    let (svc, _) = api(|_| page("[]", None));
    for uri in [
        format!("/orders?email=ann@example.org&api_key={KEY}"),
        // `find("://")` meets the return URL in the query: everything before it is taken as
        // the scheme and printed as it is.
        format!("/orders?api_key={KEY}&return=https://app.example.com/"),
    ] {
        let e = Paginate::new(svc.clone(), &uri, JsonCursor::new("/data", "/next")).unwrap_err();
        clean(&uri, &e.to_string());
        clean(&uri, &format!("{e:?}"));
    }
}

/// A next link that loops back to the page it came from, its query holding an `@` then a key.
#[tokio::test]
async fn a_loop_error_hides_a_query_secret_after_an_at_sign() {
    let start = format!("https://api.example.com/x?owner=ann@example.org&api_key={KEY}");
    let link = format!("<{start}>; rel=\"next\"");
    let (svc, _) = api(move |_| page("[1]", Some(&link)));
    let pager = Paginate::new(svc, &start, LinkHeader::new("").without_limit_param()).unwrap();
    let e = pager.items().try_collect::<Vec<Value>>().await.unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
    clean("loop", &e.to_string());
}

/// The message must stay useful: the host is named when the path holds an `@` (`/users/@me`,
/// `/@scope/pkg`), and there is no userinfo to hide.
#[test]
fn the_host_is_shown_when_the_path_holds_an_at_sign() {
    let r = raw("https://api.example.com/users/@me/orders", &json!([]));
    let d = format!("{r:?}");
    assert!(d.contains("api.example.com"), "{d}");
}

/// What the fix promises, in more shapes: a password with `@`, `/`, `?`, `#` or `:` hidden,
/// network paths, fragments, and the host shown.
#[test]
fn userinfo_of_any_shape_is_hidden_and_the_host_shown() {
    let (svc, _) = api(|_| page("[]", None));
    for (uri, host) in [
        (
            format!("https://user:{PW}@api.example.com/o?api_key={KEY}"),
            "api.example.com",
        ),
        (
            format!("https://user:a@b{PW}@api.example.com/o"),
            "api.example.com",
        ),
        (
            format!("https://{PW}@api.example.com:8443/o#k={KEY}"),
            "api.example.com:8443",
        ),
        (
            format!("https://api.example.com/o#access_token={KEY}"),
            "api.example.com",
        ),
    ] {
        let b = Paginate::builder(svc.clone(), &uri, JsonCursor::new("/data", "/next"));
        let d = format!("{b:?}");
        clean(&uri, &d);
        assert!(d.contains(host), "{uri}: {d}");
        if let Ok(p) = b.build() {
            clean(&uri, &format!("{p:?}"));
        }
        if let Ok(u) = uri.parse::<http::Uri>() {
            let r = raw(&u.to_string(), &json!([]));
            let d = format!("{r:?}");
            clean(&uri, &d);
        }
    }
}

/// A password holding `#` (not percent-encoded): `http` reads the URI as host `user`, "port"
/// the password, and drops the rest as a fragment; the pager is built, and its `Debug` shows
/// the parsed base, which has no `@` left to cut at.
#[test]
fn a_password_with_a_hash_stays_out_of_the_pagers_debug() {
    let (svc, _) = api(|_| page("[]", None));
    let uri = format!("https://user:{PW}#x@api.example.com/o");
    let b = Paginate::builder(svc, &uri, JsonCursor::new("/data", "/next"));
    clean(&uri, &format!("{b:?}"));
    match b.build() {
        Ok(p) => clean(&uri, &format!("{p:?}")),
        Err(e) => clean(&uri, &e.to_string()),
    }
}

/// A foreign-origin next link is refused naming origins only.
#[tokio::test]
async fn a_foreign_next_link_names_origins_only() {
    let start = format!("https://u:{PW}@api.example.com/x?q=a@b&api_key={KEY}");
    let link = format!("<https://u:{PW}@evil.example/p?q=a@b&api_key={KEY}>; rel=\"next\"");
    let (svc, _) = api(move |_| page("[1]", Some(&link)));
    let pager = Paginate::new(svc, &start, LinkHeader::new("").without_limit_param()).unwrap();
    let e = pager.items().try_collect::<Vec<Value>>().await.unwrap_err();
    let m = e.to_string();
    clean("foreign", &m);
    assert!(
        m.contains("evil.example") && m.contains("api.example.com"),
        "{m}"
    );
}

// ---------------------------------------------------------------- totals

fn parse(s: &dyn PageStrategy, body: &Value, cursor: Option<&str>, size: usize) -> Parsed {
    s.parse(&raw("http://h/x", body), cursor, Some(size))
        .unwrap()
}

type Named = (&'static str, Box<dyn PageStrategy>, Option<&'static str>);

fn strategies(items: &str, total: &str) -> [Named; 2] {
    [
        (
            "PageNumber",
            Box::new(PageNumber::new(items).with_total(total)) as Box<dyn PageStrategy>,
            Some("1"),
        ),
        (
            "OffsetLimit",
            Box::new(OffsetLimit::new(items).with_total(total)),
            Some("0"),
        ),
    ]
}

/// A total inside the items (repeated on every row, a top-level array or under `/data`).
#[test]
fn a_total_inside_the_items_reads() {
    for (items, total) in [("", "/0/total_count"), ("/data", "/data/1/total")] {
        let rows = json!([{"id": 1, "total_count": 3, "total": 3}, {"id": 2, "total_count": 3, "total": 3}]);
        let body = if items.is_empty() {
            rows
        } else {
            json!({ "data": rows })
        };
        for (name, s, first) in strategies(items, total) {
            // 2 of 3 seen: more to come, though the page is full.
            let p = parse(&*s, &body, first, 2);
            assert_eq!(p.items.len(), 2);
            assert!(p.next.is_some(), "{items} {total}: {name}");
            // 2 of 2 asked for with a total of 3: still more; with a page size of 1 it is
            // also more.
            let p = parse(&*s, &body, first, 1);
            assert!(p.next.is_some(), "{name}");
        }
        let rows = json!([{"id": 1, "total_count": 2, "total": 2}, {"id": 2, "total_count": 2, "total": 2}]);
        let body = if items.is_empty() {
            rows
        } else {
            json!({ "data": rows })
        };
        for (name, s, first) in strategies(items, total) {
            // 2 of 2: the last, though the page is full.
            let p = parse(&*s, &body, first, 2);
            assert_eq!((p.items.len(), p.next), (2, None), "{name}");
        }
    }
}

/// A total beside the items, missing, not a number, on an empty page.
#[test]
fn totals_outside_missing_or_not_numbers() {
    for (name, s, first) in strategies("/data", "/meta/total") {
        // Beside: 2 seen of 5.
        let p = parse(
            &*s,
            &json!({"data": [1, 2], "meta": {"total": 5}}),
            first,
            2,
        );
        assert!(p.next.is_some(), "{name}");
        // Beside, reached on a short page.
        let p = parse(&*s, &json!({"data": [1], "meta": {"total": 1}}), first, 2);
        assert_eq!(p.next, None, "{name}");
        // An empty page is the last whatever the total says, or whether there is one.
        for body in [
            json!({"data": [], "meta": {"total": 50}}),
            json!({"data": []}),
            json!({"data": [], "meta": {"total": "many"}}),
            json!({"data": [], "meta": {"total": -1}}),
        ] {
            let p = parse(&*s, &body, first, 2);
            assert_eq!((p.items.len(), p.next), (0, None), "{name} {body}");
        }
        // Missing or not a number on a page with items: a malformed page, naming the pointer.
        for body in [
            json!({"data": [1, 2]}),
            json!({"data": [1, 2], "meta": {"total": "5"}}),
            json!({"data": [1, 2], "meta": {"total": 2.5}}),
            json!({"data": [1, 2], "meta": {"total": -1}}),
            json!({"data": [1, 2], "meta": {"total": null}}),
        ] {
            let e = s
                .parse(&raw("http://h/x", &body), first, Some(2))
                .unwrap_err();
            assert!(e.to_string().contains("/meta/total"), "{name} {body}: {e}");
        }
    }
    // A total that points at the items themselves (an array, not a number): an error, not a
    // total read from the emptied slot.
    for (name, s, first) in strategies("/data", "/data") {
        let e = s.parse(&raw("http://h/x", &json!({"data": [1, 2]})), first, Some(2));
        assert!(e.is_err(), "{name}: {e:?}");
    }
    // A total inside the items on an empty page: the page is the last.
    for (name, s, first) in strategies("", "/0/total_count") {
        let p = parse(&*s, &json!([]), first, 2);
        assert_eq!(p.next, None, "{name}");
    }
}

/// A whole walk with the total inside the items ends on the total, with no extra request.
#[tokio::test]
async fn a_walk_with_the_total_inside_the_items_ends_on_it() {
    let (svc, count) = api(|pq| {
        let n = pq
            .split(['?', '&'])
            .find_map(|kv| kv.strip_prefix("page="))
            .unwrap_or("1");
        let rows: Vec<Value> = match n {
            "1" => vec![
                json!({"id": 1, "total_count": 3}),
                json!({"id": 2, "total_count": 3}),
            ],
            "2" => vec![json!({"id": 3, "total_count": 3})],
            _ => vec![],
        };
        page(&Value::Array(rows).to_string(), None)
    });
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/rows",
        PageNumber::new("").with_total("/0/total_count"),
    )
    .with_page_size(2)
    .build()
    .unwrap();
    let items: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(items.len(), 3);
    // Page 2 is short, so the estimate of rows seen (2 pages x 1 row) is low: the empty third
    // page ends the walk, as documented.
    assert!(count.get() <= 3, "{} requests", count.get());
}
