//! `sturdy::core::headers::parse_link` and `next_link` on edge and hostile `Link` headers (one
//! malformed line among others, empty list elements, anchors, bounds, non-UTF-8 bytes, huge
//! inputs), and a `LinkHeader` walk over such pages.
#![cfg(feature = "full")]

use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::Full;
use sturdy::core::headers::{next_link, parse_link, MAX_LINKS, MAX_LINK_PARAMS};
use sturdy::core::BoxError;

const PAGE: &str = "https://api.example.com/orders?page=1";

fn lines(ls: &[&[u8]]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for l in ls {
        h.append("link", HeaderValue::from_bytes(l).unwrap());
    }
    h
}

fn next(ls: &[&str]) -> Option<String> {
    let b: Vec<&[u8]> = ls.iter().map(|l| l.as_bytes()).collect();
    next_link(&lines(&b), PAGE)
}

fn rels(ls: &[&str]) -> Vec<(String, String)> {
    let b: Vec<&[u8]> = ls.iter().map(|l| l.as_bytes()).collect();
    parse_link(&lines(&b), PAGE)
        .iter()
        .map(|l| (l.rel().to_owned(), l.target().to_owned()))
        .collect()
}

const P2: &str = "https://api.example.com/orders?page=2";

/// A malformed first line (of many shapes) ends only itself: the next line's `next` is found.
#[test]
fn a_malformed_line_hides_no_other_line() {
    let bad = [
        "preload; </style.css>",
        ",",
        ",,,,",
        " , ",
        "<",
        ">",
        "<a",
        "<a>; rel=\"next\\\"",
        "<a>; rel",
        "<a>; =x; rel=next",
        "<a> rel=next",
        "<a>;;;; rel=next; <b>",
        "<a>; title=\"unterminated, <https://evil.example/>; rel=next",
        "garbage",
        ";",
        "<a>; rel=next; title*=UTF-8''%ZZ",
        "\"<a>\"; rel=next",
        "<<a>>; rel=next",
        "<a>; rel=next; anchor=",
    ];
    for b in bad {
        let two = [b, "<https://api.example.com/orders?page=2>; rel=next"];
        // Appendix B reads some of these leniently as a link of their own (`<a>; =x; rel=next`
        // is a `next` link to `a`); what matters is that the second line is still read.
        let got = next(&two);
        assert!(
            got.as_deref() == Some(P2) || got.as_deref() == Some("https://api.example.com/a"),
            "first line {b:?}: {got:?}"
        );
        let all = rels(&two);
        assert!(
            all.iter().any(|(r, t)| r == "next" && t == P2),
            "first line {b:?}: {all:?}"
        );
        // And the order reversed: the good line comes first and is kept.
        assert_eq!(
            next(&["<https://api.example.com/orders?page=2>; rel=next", b]).as_deref(),
            Some(P2),
            "second line {b:?}"
        );
    }
}

/// A malformed link keeps the links before it on its line.
#[test]
fn a_malformed_link_keeps_the_links_before_it() {
    let got = rels(&["<p0>; rel=prev, <p2>; rel=next, <oops; rel=last"]);
    assert_eq!(
        got,
        vec![
            ("prev".into(), "https://api.example.com/p0".into()),
            ("next".into(), "https://api.example.com/p2".into()),
        ]
    );
}

/// Empty list elements anywhere are skipped.
#[test]
fn empty_list_elements_are_skipped() {
    for l in [
        "<p0>; rel=prev,, <p2>; rel=next",
        ",<p0>; rel=prev, <p2>; rel=next",
        ", , ,<p0>; rel=prev ,\t, <p2>; rel=next ,,",
        "<p0>; rel=prev,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,<p2>; rel=next,",
    ] {
        assert_eq!(
            rels(&[l]),
            vec![
                ("prev".into(), "https://api.example.com/p0".into()),
                ("next".into(), "https://api.example.com/p2".into()),
            ],
            "{l:?}"
        );
        assert_eq!(
            next(&[l]).as_deref(),
            Some("https://api.example.com/p2"),
            "{l:?}"
        );
    }
}

/// Commas and semicolons inside `<...>` and inside quoted strings do not split links.
#[test]
fn commas_in_targets_and_quoted_strings_do_not_split() {
    assert_eq!(
        next(&["<https://api.example.com/o?a=1,2;b=3>; rel=next"]).as_deref(),
        Some("https://api.example.com/o?a=1,2;b=3")
    );
    assert_eq!(
        next(&[
            "<https://api.example.com/x>; title=\"a, <https://evil.example/>; rel=next\", <p2>; rel=next"
        ])
        .as_deref(),
        Some("https://api.example.com/p2")
    );
    assert_eq!(
        next(&["<https://api.example.com/x>; title=\"q\\\"uote, <https://evil.example/>; rel=next\", <p2>; rel=next"])
            .as_deref(),
        Some("https://api.example.com/p2")
    );
}

/// Anchors: this page's (none, a fragment, the page itself, an empty reference) or another
/// resource's (passed over by `next_link`, kept by `parse_link`).
#[test]
fn next_link_reads_anchors() {
    let this_page = [
        "anchor=\"#frag\"",
        "anchor=\"\"",
        "anchor=\"https://api.example.com/orders?page=1\"",
        "anchor=\"https://api.example.com/orders?page=1#x\"",
        "anchor=\"/orders?page=1\"",
        "anchor=\"?page=1\"",
        "anchor=\"orders?page=1\"",
        "anchor=\"./orders?page=1#top\"",
        "anchor=\"//api.example.com/orders?page=1\"",
    ];
    for a in this_page {
        assert_eq!(
            next(&[&format!("<p2>; rel=next; {a}")]).as_deref(),
            Some("https://api.example.com/p2"),
            "{a}"
        );
    }
    let other = [
        "anchor=\"https://other.example/orders?page=1\"",
        "anchor=\"/orders?page=7\"",
        "anchor=\"/other\"",
        "anchor=\"?page=2\"",
        "anchor=\"http://api.example.com/orders?page=1\"",
        "anchor=\"https://api.example.com:8443/orders?page=1\"",
        "anchor=\"/orders\"",
    ];
    for a in other {
        let l = format!("<p2>; rel=next; {a}, <p3>; rel=next");
        assert_eq!(
            next(&[&l]).as_deref(),
            Some("https://api.example.com/p3"),
            "{a}"
        );
        assert_eq!(next(&[&format!("<p2>; rel=next; {a}")]), None, "{a}");
        let all = parse_link(&lines(&[l.as_bytes()]), PAGE);
        assert!(all[0].param("anchor").is_some(), "{a}: {all:?}");
    }
}

/// Appendix B of RFC 8288 reads an unterminated quoted string to the end of its input, so
/// `rel="next` is a `next` link.
#[test]
fn an_unterminated_quoted_rel_reads_to_the_end() {
    assert_eq!(
        next(&["<a>; rel=\"next", "<p2>; rel=next"]).as_deref(),
        Some("https://api.example.com/a")
    );
}

/// An anchor that names the page itself in another spelling of the same URI (RFC 3986 §6.2.2
/// and §6.2.3: scheme and host case, the default port, percent-encoded unreserved characters,
/// an empty path) is this page's.
#[test]
fn an_anchor_naming_this_page_in_another_spelling_is_this_pages() {
    let mut failures = Vec::new();
    for a in [
        "HTTPS://API.EXAMPLE.COM/orders?page=1",
        "https://api.example.com:443/orders?page=1",
        "https://api.example.com/%6Frders?page=1",
        "https://Api.Example.Com/orders?page=1#Frag",
    ] {
        let got = next(&[&format!("<p2>; rel=next; anchor=\"{a}\"")]);
        if got.as_deref() != Some("https://api.example.com/p2") {
            failures.push(format!("{a}: {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// A repeated `anchor` keeps its first value, in `next_link` as in `parse_link`.
#[test]
fn a_repeated_anchor_keeps_its_first_value() {
    assert_eq!(
        next(&["<p2>; rel=next; anchor=\"#a\"; anchor=\"https://other.example/\""]).as_deref(),
        Some("https://api.example.com/p2")
    );
    assert_eq!(
        next(&["<p2>; rel=next; anchor=\"https://other.example/\"; anchor=\"#a\""]),
        None
    );
}

/// `rel` after more than `MAX_LINK_PARAMS` other parameters still counts (the bound is on
/// parameters other than `rel`).
#[test]
fn rel_after_many_parameters_counts() {
    let mut l = String::from("<p2>");
    for i in 0..MAX_LINK_PARAMS + 8 {
        l.push_str(&format!("; p{i}=v"));
    }
    l.push_str("; rel=next");
    assert_eq!(next(&[&l]).as_deref(), Some("https://api.example.com/p2"));
    let all = parse_link(&lines(&[l.as_bytes()]), PAGE);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].params().len(), MAX_LINK_PARAMS);
}

/// An `anchor` naming another resource after more than `MAX_LINK_PARAMS` parameters: the link
/// still has that anchor (RFC 8288 §3.2), so it is not this page's `next`.
#[test]
fn an_anchor_after_many_parameters_still_names_its_resource() {
    let mut l = String::from("<p2>; rel=next");
    for i in 0..MAX_LINK_PARAMS + 1 {
        l.push_str(&format!("; p{i}=v"));
    }
    l.push_str("; anchor=\"https://other.example/\"");
    assert_eq!(next(&[&l]), None, "{l}");
}

/// `MAX_LINKS` bounds `parse_link`; `next_link` reads past it.
#[test]
fn bounds_of_links() {
    let mut l = String::new();
    for i in 0..300 {
        l.push_str(&format!("<i{i}>; rel=\"item alternate\", "));
    }
    l.push_str("<p2>; rel=next");
    let all = parse_link(&lines(&[l.as_bytes()]), PAGE);
    assert_eq!(all.len(), MAX_LINKS);
    assert_eq!(next(&[&l]).as_deref(), Some("https://api.example.com/p2"));
}

/// Non-UTF-8 bytes (obs-text) in one line hide no other line; in a parameter of the `next`
/// link itself they do not make the link vanish silently either way without a bound.
#[test]
fn non_utf8_bytes_hide_no_other_line() {
    let bad: [&[u8]; 4] = [
        b"<https://api.example.com/\xff>; rel=prev",
        b"<a>; rel=prev; title=\"caf\xe9\"",
        b"\xc3\x28\xa0\xa1",
        b"<a>; rel=\"prev\xff\"",
    ];
    for b in bad {
        let h = lines(&[b, b"<https://api.example.com/orders?page=2>; rel=next"]);
        assert_eq!(next_link(&h, PAGE).as_deref(), Some(P2), "{b:?}");
        let all = parse_link(&h, PAGE);
        assert!(all.iter().any(|l| l.rel() == "next"), "{b:?}: {all:?}");
    }
    // A non-UTF-8 title on the next link itself.
    let h = lines(&[b"<https://api.example.com/orders?page=2>; rel=next; title=\"caf\xe9\""]);
    let _ = next_link(&h, PAGE);
    let _ = parse_link(&h, PAGE);
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

/// Huge and hostile inputs: bounded time and the right answer.
#[test]
fn hostile_inputs_take_linear_time() {
    let budget = Duration::from_secs(5);
    let cases: Vec<(&str, Vec<Vec<u8>>, Option<&str>)> = vec![
        (
            "4 MiB of commas",
            vec![vec![b','; 4 << 20], b"<p2>; rel=next".to_vec()],
            Some("https://api.example.com/p2"),
        ),
        (
            "4 MiB of commas then next on the same line",
            vec![[vec![b','; 4 << 20], b"<p2>; rel=next".to_vec()].concat()],
            Some("https://api.example.com/p2"),
        ),
        (
            "100k lines of ','",
            {
                let mut v = vec![b",".to_vec(); 100_000];
                v.push(b"<p2>; rel=next".to_vec());
                v
            },
            Some("https://api.example.com/p2"),
        ),
        (
            "100k malformed lines",
            {
                let mut v = vec![b"preload; </s.css>".to_vec(); 100_000];
                v.push(b"<p2>; rel=next".to_vec());
                v
            },
            Some("https://api.example.com/p2"),
        ),
        (
            "one 2 MiB unterminated quote",
            vec![
                [b"<a>; title=\"".to_vec(), vec![b'x'; 2 << 20]].concat(),
                b"<p2>; rel=next".to_vec(),
            ],
            Some("https://api.example.com/p2"),
        ),
        (
            "2 MiB of '<' ",
            vec![vec![b'<'; 2 << 20], b"<p2>; rel=next".to_vec()],
            Some("https://api.example.com/p2"),
        ),
        (
            "200k empty-ish links with foreign anchors",
            vec![
                b"<p9>; rel=next; anchor=\"https://o.example/\", ".repeat(50_000),
                b"<p2>; rel=next".to_vec(),
            ],
            Some("https://api.example.com/p2"),
        ),
        (
            "many ';' parameters",
            vec![[
                b"<p2>".to_vec(),
                b"; a=b".repeat(400_000),
                b"; rel=next".to_vec(),
            ]
            .concat()],
            Some("https://api.example.com/p2"),
        ),
        (
            "many quoted escapes",
            vec![[
                b"<x>; title=\"".to_vec(),
                b"\\\"".repeat(1 << 20),
                b"\", <p2>; rel=next".to_vec(),
            ]
            .concat()],
            Some("https://api.example.com/p2"),
        ),
    ];
    for (name, ls, want) in cases {
        let refs: Vec<&[u8]> = ls.iter().map(|l| l.as_slice()).collect();
        let h = lines(&refs);
        let (got, t) = timed(|| next_link(&h, PAGE));
        assert_eq!(got.as_deref(), want, "{name}");
        assert!(t < budget, "{name}: next_link took {t:?}");
        let (all, t) = timed(|| parse_link(&h, PAGE));
        assert!(t < budget, "{name}: parse_link took {t:?}");
        assert!(all.len() <= MAX_LINKS, "{name}");
    }
}

/// A long request URI against many relative links and anchors: time stays bounded.
#[test]
fn a_long_request_uri_against_many_relative_anchors() {
    let uri = format!("https://api.example.com/{}?q=1", "a/".repeat(30_000));
    let line = b"<x>; rel=item; anchor=\"y\", ".repeat(20_000);
    let h = lines(&[&line, b"<p2>; rel=next"]);
    let (got, t) = timed(|| next_link(&h, &uri));
    assert!(t < Duration::from_secs(5), "next_link took {t:?}");
    assert!(got.is_some());
    let (all, t) = timed(|| parse_link(&h, &uri));
    assert!(t < Duration::from_secs(5), "parse_link took {t:?}");
    assert!(all.len() <= MAX_LINKS);
}

type BoxFut = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>,
>;

/// A `LinkHeader` walk over pages whose first `Link` line is malformed and whose `next` sits on
/// a later line (page 1) or after empty elements (page 2), and whose page 3 lists only another
/// resource's next: three pages, then the end.
#[tokio::test]
async fn a_link_header_walk_reads_past_a_malformed_line() {
    use futures_util::TryStreamExt;
    use sturdy::paginate::{LinkHeader, Paginate};
    let api = tower::service_fn(|req: Request<Full<Bytes>>| -> BoxFut {
        Box::pin(async move {
            let q = req.uri().query().unwrap_or("").to_owned();
            let (links, items): (Vec<&str>, &str) = if q.contains("page=2") {
                (
                    vec![",,, <?page=1>; rel=prev,, <?page=3>; rel=next,,"],
                    "[3,4]",
                )
            } else if q.contains("page=3") {
                (
                    vec!["<?page=4>; rel=next; anchor=\"https://other.example/feed\""],
                    "[5]",
                )
            } else {
                (
                    vec!["preload; </style.css>", ",", "<?page=2>; rel=next"],
                    "[1,2]",
                )
            };
            let mut res = Response::new(Full::from(items));
            for l in links {
                res.headers_mut()
                    .append("link", HeaderValue::from_str(l).unwrap());
            }
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            Ok(res)
        })
    });
    let pager = Paginate::new(api, "http://api.example.com/orders", LinkHeader::new("")).unwrap();
    let items: Vec<serde_json::Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(items, vec![1, 2, 3, 4, 5]);
}

/// A next link that is no URI (a space, a quote in it) ends a walk with a
/// `Pagination` error after the first page's items, never silently.
#[tokio::test]
async fn a_next_link_that_is_no_uri_ends_the_walk_with_an_error() {
    use futures_util::StreamExt;
    use sturdy::paginate::{LinkHeader, Paginate};
    let bad: [&'static [u8]; 2] = [
        b"<https://api.example.com/orders?page=2 x>; rel=next",
        b"<https://api.example.com/orders?page=\"2\">; rel=next",
    ];
    for b in bad {
        let api = tower::service_fn(move |_req: Request<Full<Bytes>>| -> BoxFut {
            Box::pin(async move {
                let mut res = Response::new(Full::from("[1,2]"));
                res.headers_mut()
                    .append("link", HeaderValue::from_bytes(b).unwrap());
                Ok(res)
            })
        });
        let pager =
            Paginate::new(api, "https://api.example.com/orders", LinkHeader::new("")).unwrap();
        let got: Vec<Result<serde_json::Value, sturdy::core::Error>> = pager
            .items()
            .map(|r| r.map_err(|e| sturdy::core::Error::new(e.kind().clone(), e.to_string())))
            .collect()
            .await;
        let case = String::from_utf8_lossy(b).into_owned();
        assert_eq!(got.len(), 3, "{case}: {got:?}");
        let err = got[2].as_ref().unwrap_err();
        assert!(
            matches!(err.kind(), sturdy::core::ErrorKind::Pagination),
            "{case}: {err}"
        );
    }
}

/// Seeded random `Link` lines built from the grammar's own characters, against odd request
/// URIs: no panic, at most `MAX_LINKS` links, `next_link` agreeing with `parse_link` when the
/// first `next` has no anchor and the bound was not reached.
#[test]
fn random_link_lines_never_panic() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let atoms: &[&[u8]] = &[
        b"<",
        b">",
        b";",
        b",",
        b"=",
        b"\"",
        b"\\",
        b" ",
        b"\t",
        b"rel",
        b"next",
        b"prev",
        b"anchor",
        b"title*",
        b"UTF-8''%C3%A9",
        b"#",
        b"?",
        b"/",
        b"..",
        b"//",
        b"http:",
        b"https://h.example",
        b"p2",
        b"\xff",
        b"\xc3",
        b"%",
        b"[",
        b"]",
        b"@",
        b":",
    ];
    let uris = [
        "https://api.example.com/orders?page=1",
        "",
        "/relative",
        "not a uri",
        "https://[::1]:99999/",
        "http://a/b/c/d;p?q",
        "mailto:x@y",
    ];
    for round in 0..20_000 {
        let mut h = HeaderMap::new();
        for _ in 0..1 + rnd(3) {
            let mut line = Vec::new();
            for _ in 0..rnd(40) {
                line.extend_from_slice(atoms[rnd(atoms.len())]);
            }
            if let Ok(v) = HeaderValue::from_bytes(&line) {
                h.append("link", v);
            }
        }
        let uri = uris[round % uris.len()];
        let all = parse_link(&h, uri);
        assert!(all.len() <= MAX_LINKS);
        let n = next_link(&h, uri);
        if let Some(first) = all.iter().find(|l| l.rel() == "next") {
            if first.param("anchor").is_none() {
                assert_eq!(n.as_deref(), Some(first.target()), "{h:?} against {uri:?}");
            }
        } else if all.len() < MAX_LINKS {
            assert_eq!(n, None, "{h:?} against {uri:?}");
        }
    }
}

/// Walks two pages from a pager whose URI spells the host with capitals; the server's links
/// spell it in lower case, with or without an anchor naming the page. Returns the items or
/// the error.
async fn walk_from_capitalised_host(anchor: bool) -> Result<Vec<serde_json::Value>, String> {
    use futures_util::TryStreamExt;
    use sturdy::paginate::{LinkHeader, Paginate};
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| -> BoxFut {
        Box::pin(async move {
            let second = req.uri().query() == Some("page=2");
            let mut res = Response::new(Full::from(if second { "[3]" } else { "[1,2]" }));
            if !second {
                let l = if anchor {
                    "<https://api.example.com/orders?page=2>; rel=next; anchor=\"https://api.example.com/orders\""
                } else {
                    "<https://api.example.com/orders?page=2>; rel=next"
                };
                res.headers_mut()
                    .insert("link", HeaderValue::from_static(l));
            }
            Ok(res)
        })
    });
    let pager = Paginate::new(
        api,
        "https://Api.Example.com/orders",
        LinkHeader::new("").without_limit_param(),
    )
    .map_err(|e| e.to_string())?;
    pager.items().try_collect().await.map_err(|e| e.to_string())
}

/// Host names are case-insensitive (RFC 3986 §3.2.2, RFC 6454 §4): a next link to the same
/// host in lower case is not a foreign origin.
#[tokio::test]
async fn a_next_link_to_the_same_host_in_another_case_is_followed() {
    let got = walk_from_capitalised_host(false).await;
    assert_eq!(got, Ok(vec![1.into(), 2.into(), 3.into()]));
}

/// The same with an anchor naming the first page (in lower case): it is this page's next link.
#[tokio::test]
async fn an_anchor_naming_the_page_in_lower_case_is_followed() {
    let got = walk_from_capitalised_host(true).await;
    assert_eq!(got, Ok(vec![1.into(), 2.into(), 3.into()]));
}
