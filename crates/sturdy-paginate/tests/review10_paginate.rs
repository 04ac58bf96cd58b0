//! Review of the day's pagination changes: items moved out of the parse (`take_items_at`), the
//! origin of next links (empty, out-of-range and padded ports, IPv6, userinfo), and `shown`
//! redaction in messages and `Debug`.

use crate::support;
use support::{api, page};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderMap, StatusCode, Uri};
use serde_json::{json, Value};
use sturdy_paginate::{
    JsonCursor, LinkHeader, OffsetLimit, PageNumber, PageStrategy, Paginate, RawPage,
};

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

// ---------------------------------------------------------------- take_items_at

/// The JSON cursor reads its next cursor before the items are moved out, so a next pointer
/// inside the items (the last item's id) still reads.
#[test]
fn json_cursor_reads_next_before_the_items_move() {
    let body = json!([{"id": "a"}, {"id": "b"}]);
    let p = JsonCursor::new("", "/1/id")
        .parse(&raw("http://h/x", &body), None, None)
        .unwrap();
    assert_eq!(p.items.len(), 2);
    assert_eq!(p.next.as_deref(), Some("b"));
}

/// Page numbers and offsets read a total beside the items after moving them out.
#[test]
fn totals_beside_the_items_still_read() {
    let body = json!({"data": [1, 2], "meta": {"total": 4}});
    let p = PageNumber::new("/data")
        .with_total("/meta/total")
        .with_page_size(2)
        .parse(&raw("http://h/x", &body), None, Some(2))
        .unwrap();
    assert_eq!((p.items.len(), p.next.as_deref()), (2, Some("2")));
    let p = PageNumber::new("/data")
        .with_total("/meta/total")
        .parse(&raw("http://h/x", &body), Some("2"), Some(2))
        .unwrap();
    assert_eq!(p.next, None, "4 of 4 seen");
    let p = OffsetLimit::new("/data")
        .with_total("/meta/total")
        .parse(&raw("http://h/x", &body), Some("2"), Some(2))
        .unwrap();
    assert_eq!(p.next, None, "offset 2 + 2 = total 4");
    let p = OffsetLimit::new("/data")
        .with_total("/meta/total")
        .parse(&raw("http://h/x", &body), None, Some(2))
        .unwrap();
    assert_eq!(p.next.as_deref(), Some("2"));
}

/// A top-level array (items pointer "") is taken whole.
#[test]
fn a_top_level_array_is_taken_whole() {
    let body = json!([1, 2, 3]);
    for s in [
        Box::new(LinkHeader::new("")) as Box<dyn PageStrategy>,
        Box::new(PageNumber::new("")),
        Box::new(OffsetLimit::new("")),
        Box::new(JsonCursor::new("", "/9")),
    ] {
        let p = s.parse(&raw("http://h/x", &body), None, Some(3)).unwrap();
        assert_eq!(p.items, vec![json!(1), json!(2), json!(3)]);
    }
}

/// A total carried inside the items (each row holds the full count, as SQL's
/// `count(*) over ()` gives it) read before this change: the items were copied, and the pointer
/// `/0/total_count` still found the first row. Now the array is emptied before the total is read.
#[test]
fn a_total_inside_the_items_still_reads() {
    let body = json!([{"id": 1, "total_count": 3}, {"id": 2, "total_count": 3}]);
    let p = PageNumber::new("").with_total("/0/total_count").parse(
        &raw("http://h/x", &body),
        None,
        Some(2),
    );
    assert_eq!(
        p.map(|p| (p.items.len(), p.next))
            .map_err(|e| e.to_string()),
        Ok((2, Some("2".to_owned())))
    );
    let body = json!({"data": [{"id": 1, "n": 2}, {"id": 2, "n": 2}]});
    let p = OffsetLimit::new("/data").with_total("/data/0/n").parse(
        &raw("http://h/x", &body),
        None,
        Some(2),
    );
    assert_eq!(
        p.map(|p| (p.items.len(), p.next))
            .map_err(|e| e.to_string()),
        Ok((2, None))
    );
}

/// `take_items_at` says "an empty array is left there".
#[test]
fn take_items_at_leaves_what_its_doc_says() {
    let mut json = json!({"data": [1, 2]});
    let r = raw("http://h/x", &json);
    let items = r.take_items_at(&mut json, "/data").unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(json.pointer("/data"), Some(&json!([])));
}

/// Errors of `take_items_at` are the same as `items_at`'s.
#[test]
fn take_items_at_errors_match_items_at() {
    for (body, ptr) in [
        (json!({"data": 5}), "/data"),
        (json!({"data": null}), "/data"),
        (json!({}), "/data"),
        (json!({"x": [1]}), "/x/0"),
        (json!(7), ""),
    ] {
        let r = raw("http://h/x", &body);
        let a = r.items_at(&body, ptr).unwrap_err().to_string();
        let mut b = body.clone();
        let t = r.take_items_at(&mut b, ptr).unwrap_err().to_string();
        assert_eq!(a, t, "{body} {ptr}");
        assert_eq!(b, body, "a failed take leaves the JSON as it was");
    }
}

// ---------------------------------------------------------------- origin

/// Walks from `start`, whose first page links to `next`; `Ok(pages fetched)` or the error.
async fn walk(start: &str, next: &str) -> Result<usize, String> {
    let first = Uri::try_from(start).unwrap();
    let first_pq = first.path_and_query().unwrap().as_str().to_owned();
    let link = format!("<{next}>; rel=\"next\"");
    let (svc, count) = api(move |pq| {
        if pq == first_pq {
            page("[1]", Some(&link))
        } else {
            page("[2]", None)
        }
    });
    let pager = Paginate::new(svc, start, LinkHeader::new("").without_limit_param())
        .map_err(|e| e.to_string())?;
    match pager.items().try_collect::<Vec<Value>>().await {
        Ok(items) => {
            assert_eq!(items.len(), 2, "{start} -> {next}");
            Ok(count.get())
        }
        Err(e) => Err(e.to_string()),
    }
}

fn refused(r: &Result<usize, String>) -> bool {
    matches!(r, Err(e) if e.contains("another origin"))
}

#[tokio::test]
async fn empty_and_zero_padded_ports_are_the_default_origin() {
    for (start, next) in [
        ("http://api.example.com/x", "http://api.example.com:/p2"),
        ("http://api.example.com:/x", "http://api.example.com/p2"),
        ("http://api.example.com/x", "http://api.example.com:0080/p2"),
        ("https://api.example.com/x", "https://API.example.com:/p2"),
        ("http://[::1]/x", "http://[::1]:/p2"),
        ("http://[::1]:8080/x", "http://[0:0::1]:8080/p2"),
        ("http://api.example.com/x", "http://a:b@api.example.com/p2"),
        (
            "http://u:v@api.example.com/x",
            "http://api.example.com:80/p2",
        ),
    ] {
        let r = walk(start, next).await;
        // `[0:0::1]` is the same address written another way; RFC 6454 compares the host as
        // written (lowercased), so refusing it is allowed too.
        if next.contains("[0:0::1]") {
            assert!(r == Ok(2) || refused(&r), "{start} -> {next}: {r:?}");
        } else {
            assert_eq!(r, Ok(2), "{start} -> {next}");
        }
    }
}

#[tokio::test]
async fn ports_out_of_range_or_wrapping_to_the_default_are_refused() {
    for (start, next) in [
        // 65616 = 65536 + 80: a port read modulo 2^16 would be 80.
        (
            "http://api.example.com/x",
            "http://api.example.com:65616/p2",
        ),
        (
            "http://api.example.com/x",
            "http://api.example.com:99999/p2",
        ),
        (
            "http://api.example.com/x",
            "http://api.example.com:4294967376/p2",
        ),
        ("http://[::1]/x", "http://[::1]:65616/p2"),
        (
            "http://api.example.com/x",
            "http://u:80@api.example.com:65616/p2",
        ),
        (
            "http://api.example.com/x",
            "http://api.example.com:80:80/p2",
        ),
    ] {
        let r = walk(start, next).await;
        assert!(
            refused(&r) || matches!(&r, Err(e) if e.contains("not a valid URI")),
            "{start} -> {next}: {r:?}"
        );
    }
}

/// Userinfo holding ':' and '@' (percent-encoded or not): the origin is what the request is
/// sent to, the host after the last '@'.
#[tokio::test]
async fn userinfo_with_colons_and_at_signs_does_not_fool_the_origin() {
    for next in [
        "http://api.example.com:80@evil.example/p2",
        "http://a:b@api.example.com@evil.example/p2",
        "http://api.example.com%40x:1@evil.example/p2",
        "http://a:b:c@evil.example:80/p2",
        "http://[::1]@evil.example/p2",
    ] {
        let r = walk("http://api.example.com/x", next).await;
        assert!(
            refused(&r) || matches!(&r, Err(e) if e.contains("not a valid URI")),
            "-> {next}: {r:?}"
        );
    }
    for next in [
        "http://a:b:c@api.example.com:80/p2",
        "http://a%40b:c%3Ad@api.example.com/p2",
    ] {
        assert_eq!(
            walk("http://api.example.com/x", next).await,
            Ok(2),
            "{next}"
        );
    }
}

// ---------------------------------------------------------------- redaction

fn clean(what: &str, shown: &str) {
    assert!(!shown.contains(PW), "{what}: {shown}");
    assert!(!shown.contains(KEY), "{what}: {shown}");
    assert!(!shown.contains("hunter"), "{what}: {shown}");
}

/// Out-of-range ports and foreign origins are named without userinfo or query.
#[tokio::test]
async fn origin_refusals_name_no_secret() {
    for next in [
        format!("http://u:{PW}@api.example.com:65616/p2?api_key={KEY}"),
        format!("http://u:{PW}@evil.example/p2?api_key={KEY}"),
    ] {
        let r = walk(
            &format!("http://u:{PW}@api.example.com/x?api_key={KEY}"),
            &next,
        )
        .await;
        let e = r.unwrap_err();
        clean(&next, &e);
    }
}

/// A builder's `Debug` shows its URI as given: a password holding '/' or '?' (not
/// percent-encoded, as base64 passwords often are) must not come through either.
#[test]
fn a_builders_debug_hides_a_password_with_slash_or_question_mark() {
    let (svc, _) = api(|_| page("[]", None));
    for uri in [
        format!("http://user:hunter/{PW}@api.example.com/orders?api_key={KEY}"),
        format!("http://user:hunter?{PW}@api.example.com/orders"),
        format!("//user:{PW}@api.example.com/orders?api_key={KEY}"),
    ] {
        let b = Paginate::builder(svc.clone(), &uri, JsonCursor::new("/data", "/next"));
        clean(&uri, &format!("{b:?}"));
        if let Err(e) = b.build() {
            clean(&uri, &e.to_string());
            clean(&uri, &format!("{e:?}"));
        }
    }
}

/// The same inputs through `build()` only: its error must not repeat them.
#[test]
fn build_errors_hide_userinfo_and_query() {
    let (svc, _) = api(|_| page("[]", None));
    for uri in [
        format!("http://user:hunter/{PW}@api.example.com/orders?api_key={KEY}"),
        format!("http://user:hunter?{PW}@api.example.com/orders"),
        format!("user:{PW}@api.example.com/orders?api_key={KEY}"),
        format!("http://user:{PW}@api.example.com:99999999999/orders?api_key={KEY}"),
    ] {
        let b = Paginate::builder(svc.clone(), &uri, JsonCursor::new("/data", "/next"));
        if let Err(e) = b.build() {
            clean(&uri, &e.to_string());
            clean(&uri, &format!("{e:?}"));
        }
    }
}

/// A network-path reference (`//user:pw@host/path`, no scheme) is refused as "not absolute", and
/// the message names its path, which `http` reads as the whole text before the query: userinfo
/// included.
#[test]
fn a_network_path_first_uri_is_refused_without_its_userinfo() {
    let (svc, _) = api(|_| page("[]", None));
    let uri = format!("//user:{PW}@api.example.com/orders?api_key={KEY}");
    let e = Paginate::new(svc, &uri, JsonCursor::new("/data", "/next")).unwrap_err();
    clean(&uri, &e.to_string());
}

/// `RawPage` is what every strategy (a user's own too) is handed; its `Debug` shows the page's
/// URI, whose userinfo and query the crate keeps out of every other `Debug`.
#[test]
fn a_raw_pages_debug_hides_userinfo_and_query() {
    let uri = format!("http://user:{PW}@api.example.com/orders?api_key={KEY}");
    let r = raw(&uri, &json!([]));
    clean("RawPage", &format!("{r:?}"));
}

/// A next link that is not a valid URI is named in the error without its userinfo or query;
/// the loop errors too.
#[tokio::test]
async fn next_link_and_loop_errors_hide_userinfo_and_query() {
    // Not a valid URI: a space in the path.
    let r = walk(
        "http://api.example.com/x",
        &format!("http://u:{PW}@api.example.com/a b?api_key={KEY}"),
    )
    .await;
    if let Err(e) = &r {
        clean("invalid next", e);
    }
    // A loop back to the first page, through a link with a query secret.
    let start = format!("http://u:{PW}@api.example.com/x?api_key={KEY}");
    let link = format!("<{start}>; rel=\"next\"");
    let (svc, _) = api(move |_| page("[1]", Some(&link)));
    let pager = Paginate::new(svc, &start, LinkHeader::new("").without_limit_param()).unwrap();
    let e = pager.items().try_collect::<Vec<Value>>().await.unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
    clean("loop", &e.to_string());
    clean("loop", &format!("{e:?}"));
    let e = pager.page(None, 5).await.map(|p| p.items.len());
    if let Ok(n) = e {
        assert_eq!(n, 1);
    }
}
