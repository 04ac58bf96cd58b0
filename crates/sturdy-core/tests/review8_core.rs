//! Review of `next_link` past `MAX_LINKS` (hostile 1 MB headers), of `query::set`'s separator
//! after an empty query or a trailing `&`, and of the rustls words in `describe`.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

use http::{HeaderMap, HeaderValue, Uri};
use sturdy_core::headers::{next_link, parse_link, MAX_LINKS};
use sturdy_core::query;

fn one_field(v: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.append(http::header::LINK, HeaderValue::from_str(v).unwrap());
    h
}

/// The time `next_link` takes on the header `make(n)` builds: the fastest of at least three
/// runs (of more when they are short), since a run that other threads preempted only ever takes
/// longer.
fn time(make: &dyn Fn(usize) -> String, n: usize, base: &str) -> (Duration, Option<String>) {
    let h = one_field(&make(n));
    let mut out = None;
    let best = crate::cost_common::fastest(3, || out = next_link(&h, base));
    (best, out)
}

/// Hostile shapes of about 1 MB, each with its `next` link last: `next_link` must find it, and
/// four times the header must cost about four times the time, not sixteen.
#[test]
fn next_link_stays_linear_on_hostile_headers() {
    let base = "http://h.example/dir/page?q=1";
    let shapes: Vec<(&str, Box<dyn Fn(usize) -> String>)> = vec![
        (
            "item links",
            Box::new(|n| {
                let mut s = "</i>; rel=\"item\", ".repeat(n / 18);
                s.push_str("</next>; rel=\"next\"");
                s
            }),
        ),
        (
            "parameters and anchors",
            Box::new(|n| {
                let one = "</i>; anchor=\"../a/b\"; title*=UTF-8''%C3%A9; p=1; rel=\"x\", ";
                let mut s = one.repeat(n / one.len());
                s.push_str("</next>; rel=\"next\"");
                s
            }),
        ),
        (
            "one link with many relation types",
            Box::new(|n| format!("</next>; rel=\"{}next\"", "r ".repeat(n / 2))),
        ),
        (
            "many parameters on one link",
            Box::new(|n| format!("</next>{}; rel=\"next\"", "; p=1".repeat(n / 5))),
        ),
        (
            "links without a rel",
            Box::new(|n| {
                let mut s = "<x>, ".repeat(n / 5);
                s.push_str("</next>; rel=\"next\"");
                s
            }),
        ),
    ];
    for (name, make) in &shapes {
        let (small, a) = time(make.as_ref(), 256 * 1024, base);
        let (large, b) = time(make.as_ref(), 1024 * 1024, base);
        assert_eq!(a.as_deref(), Some("http://h.example/next"), "{name}");
        assert_eq!(b.as_deref(), Some("http://h.example/next"), "{name}");
        eprintln!("{name}: 256 KiB {small:?}, 1 MiB {large:?}");
        assert!(
            large < small * 10 + Duration::from_millis(20),
            "{name}: 256 KiB {small:?}, 1 MiB {large:?}"
        );
    }
}

/// The anchors of links that are not kept are still resolved against the request URI: with a
/// long request URI (a cursor in the query), the work is the header's size times the URI's.
#[test]
fn next_link_with_a_long_request_uri_and_many_anchors() {
    let base = format!("http://h.example/dir/page?cursor={}", "c".repeat(8 * 1024));
    let one = "</i>;anchor=x;rel=a,";
    let mut s = one.repeat(1024 * 1024 / one.len());
    s.push_str("</next>; rel=\"next\"");
    let h = one_field(&s);
    let t = Instant::now();
    assert_eq!(
        next_link(&h, &base).as_deref(),
        Some("http://h.example/next")
    );
    let took = t.elapsed();
    let plain = one_field(&"</i>;rel=a,".repeat(1024 * 1024 / 11));
    let t = Instant::now();
    let _ = next_link(&plain, &base);
    let baseline = t.elapsed();
    eprintln!("1 MiB of anchors, 8 KiB request URI: {took:?} (without anchors {baseline:?})");
    assert!(
        took < baseline * 20 + Duration::from_millis(500),
        "{took:?} against {baseline:?}"
    );
}

/// `next_link` finds the first `next` whatever comes before it, across field lines, and stops
/// at a malformed link as `parse_link` does.
#[test]
fn next_link_semantics_past_the_bound() {
    let base = "http://h.example/a";
    let items: Vec<String> = (0..MAX_LINKS * 2)
        .map(|i| format!("</i/{i}>; rel=\"item\""))
        .collect();
    // A field line full of items, then one with two next links: the first wins.
    let mut h = one_field(&items.join(", "));
    h.append(
        http::header::LINK,
        HeaderValue::from_static("</p2>; rel=\"next\", </p3>; rel=\"next\""),
    );
    assert_eq!(parse_link(&h, base).len(), MAX_LINKS);
    assert_eq!(next_link(&h, base).as_deref(), Some("http://h.example/p2"));
    // A malformed link before the next one ends the parse, in either function.
    let h = one_field("</i>; rel=\"item\", garbage, </p2>; rel=\"next\"");
    assert_eq!(next_link(&h, base), None);
    assert!(parse_link(&h, base).iter().all(|l| l.rel() != "next"));
    // A next link whose relation is written in capitals, among others in the same rel.
    let h = one_field("</p2>; rel=\"prev NeXt last\"");
    assert_eq!(next_link(&h, base).as_deref(), Some("http://h.example/p2"));
    // `rel` given twice: the first one counts (RFC 8288), so this is not a next link.
    let h = one_field("</p2>; rel=\"item\"; rel=\"next\"");
    assert_eq!(next_link(&h, base), None);
    assert_eq!(
        next_link(&h, base),
        parse_link(&h, base)
            .iter()
            .find(|l| l.rel() == "next")
            .map(|l| l.target().to_owned())
    );
}

fn set(u: &str, pairs: &[(&str, &str)]) -> String {
    query::set(&u.parse::<Uri>().unwrap(), pairs)
        .unwrap()
        .to_string()
}

#[test]
fn query_set_separators() {
    let cases: &[(&str, &[(&str, &str)], &str)] = &[
        ("http://h/x", &[("k", "v")], "http://h/x?k=v"),
        ("http://h/x?", &[("k", "v")], "http://h/x?k=v"),
        ("http://h/x?a=1&", &[("k", "v")], "http://h/x?a=1&k=v"),
        ("http://h/x?&", &[("k", "v")], "http://h/x?&k=v"),
        ("http://h/x?a=1&&", &[("k", "v")], "http://h/x?a=1&&k=v"),
        (
            "http://h/x?",
            &[("k", "v"), ("j", "w")],
            "http://h/x?k=v&j=w",
        ),
        // The replaced pair was the only one: nothing is left before the new one.
        ("http://h/x?k=1", &[("k", "2")], "http://h/x?k=2"),
        ("http://h/x?k=1&", &[("k", "2")], "http://h/x?k=2"),
        ("http://h/x?&k=1", &[("k", "2")], "http://h/x?k=2"),
        ("http://h/x?a=1&k=1", &[("k", "2")], "http://h/x?a=1&k=2"),
        ("http://h/x?k=1&a=1", &[("k", "2")], "http://h/x?a=1&k=2"),
        // An empty name or value is still a pair of its own.
        ("http://h/x?a=1", &[("", "")], "http://h/x?a=1&="),
        ("http://h/x?", &[("k", "")], "http://h/x?k="),
        // A value that ends with `&` is encoded, so it never reads as a trailing `&`.
        (
            "http://h/x?a=1",
            &[("k", "&"), ("j", "w")],
            "http://h/x?a=1&k=%26&j=w",
        ),
    ];
    for (base, pairs, want) in cases {
        assert_eq!(set(base, pairs), *want, "{base} + {pairs:?}");
        // Every pair set is there, exactly once.
        let u: Uri = want.parse().unwrap();
        for (k, _) in *pairs {
            let n = form_urlencoded::parse(u.query().unwrap().as_bytes())
                .filter(|(n, _)| n == k)
                .count();
            assert_eq!(n, 1, "{base} + {pairs:?}");
        }
    }
}

#[test]
fn rustls_words_are_tls_and_other_texts_are_not() {
    let tls = [
        "received corrupt message of type InvalidContentType",
        "received unexpected message: got ApplicationData when expecting ServerHello",
        "peer is incompatible: Tls12NotOffered",
        "peer misbehaved: SelectedUnofferedCipherSuite",
    ];
    for t in tls {
        let e = io::Error::new(io::ErrorKind::InvalidData, t);
        let d = sturdy_core::classify::describe(&e);
        assert!(d.starts_with("TLS handshake failed"), "{t}: {d}");
    }
}
