//! The cost of hostile response headers, measured at sizes n, 4n and 16n: time must grow about
//! linearly with the header (a ratio well under 40 between 16n and n, compared within one run).
//!
//! Structured-field parameters (`RateLimit`, `Deprecation`) and `Link` anchors against a long
//! request URI, each through the public API the layers use.
#![cfg(feature = "full")]

use crate::cost_common::{fastest, ratio, scaling};
use std::convert::Infallible;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use sturdy::core::headers::{next_link, parse_link, pause_hint, sf, RateLimitItem};
use sturdy::ratelimit::RateLimitLayer;
use sturdy::version::VersionLayer;
use tower::{service_fn, Layer, ServiceExt};

/// `count` distinct parameter keys of four lowercase letters each, `;aaaa;aaab;...`: every key
/// has the same length, so telling two apart takes a byte comparison.
fn distinct_params(count: usize) -> String {
    let mut s = String::with_capacity(count * 5);
    for i in 0..count {
        let mut n = i;
        s.push(';');
        for _ in 0..4 {
            s.push(char::from(b'a' + (n % 26) as u8));
            n /= 26;
        }
    }
    s
}

fn headers(name: &str, value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
        HeaderValue::from_str(value).unwrap(),
    );
    h
}

/// The same parameter repeated (`;aaaa;aaaa;...`) parses in linear time: the baseline.
#[test]
fn ratelimit_with_one_repeated_parameter_is_linear() {
    let t = scaling(1024, |bytes| {
        let v = format!("\"default\";r=5;t=1{}", ";aaaa".repeat(bytes / 5));
        let h = headers("ratelimit", &v);
        fastest(5, || {
            let items = RateLimitItem::from_headers(&h).unwrap();
            assert_eq!(items[0].remaining, 5);
        })
    });
    eprintln!("RateLimit, one key repeated: {t:?}, ratio {:.1}", ratio(&t));
    assert!(ratio(&t) < 40.0, "{t:?}");
}

/// `RateLimit: "default";r=5;t=1;aaaa;baaa;caaa;...`, 1, 4 and 16 KiB of distinct keys: each
/// new key is compared with every key before it (`sf::Parser::params`), so 16 times the header
/// costs about 256 times the time. A 400 KiB header (what hyper's client reads) holds 80,000
/// keys: 3.2 billion comparisons on every response, parsed by `RateLimitLayer` whenever a
/// `RateLimit` header is present.
#[test]
fn ratelimit_with_distinct_parameters_is_linear() {
    let t = scaling(1024, |bytes| {
        let v = format!("\"default\";r=5;t=1{}", distinct_params(bytes / 5));
        let h = headers("ratelimit", &v);
        fastest(5, || {
            let items = RateLimitItem::from_headers(&h).unwrap();
            assert_eq!(items[0].remaining, 5);
        })
    });
    eprintln!("RateLimit, distinct keys: {t:?}, ratio {:.1}", ratio(&t));
    assert!(ratio(&t) < 40.0, "{t:?}");
}

/// The same through `RateLimitLayer`: every response with a `RateLimit` header is parsed
/// (`may_pause`, then `pause_hint`), a 200 with quota left included.
#[test]
fn ratelimit_layer_parses_distinct_parameters_in_linear_time() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let t = scaling(1024, |bytes| {
        let v = HeaderValue::from_str(&format!(
            "\"default\";r=5;t=1{}",
            distinct_params(bytes / 5)
        ))
        .unwrap();
        let svc = RateLimitLayer::adaptive_only().layer(service_fn(move |_r: Request<()>| {
            let v = v.clone();
            async move {
                Ok::<_, Infallible>(Response::builder().header("ratelimit", v).body(()).unwrap())
            }
        }));
        fastest(5, || {
            rt.block_on(async {
                let req = Request::get("http://api.example.com/x").body(()).unwrap();
                let res = svc.clone().oneshot(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::OK);
            });
        })
    });
    eprintln!(
        "RateLimitLayer, distinct keys: {t:?}, ratio {:.1}",
        ratio(&t)
    );
    assert!(ratio(&t) < 40.0, "{t:?}");
}

/// Many `RateLimit` field lines (joined with `,` into one list), each a member with 100
/// distinct keys: each member's parameters are compared among themselves only, so the work is
/// linear in the number of lines.
#[test]
fn ratelimit_many_lines_of_few_parameters_are_linear() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let t = scaling(1024, |bytes| {
        let mut h = HeaderMap::new();
        let per_line = 100;
        for _ in 0..(bytes / 5 / per_line).max(1) {
            h.append(
                "ratelimit",
                HeaderValue::from_str(&format!("\"default\";r=5;t=1{}", distinct_params(per_line)))
                    .unwrap(),
            );
        }
        fastest(5, || {
            assert!(pause_hint(StatusCode::OK, &h, now).is_none());
        })
    });
    eprintln!(
        "RateLimit, many lines of 100 keys: {t:?}, ratio {:.1}",
        ratio(&t)
    );
    assert!(ratio(&t) < 40.0, "{t:?}");
}

/// `Deprecation: @1688169599;aaaa;baaa;...`: `VersionLayer` reads it with `sf::parse_item`,
/// on every response that carries it, before it knows whether the endpoint was reported.
#[test]
fn deprecation_with_distinct_parameters_is_linear() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let t = scaling(1024, |bytes| {
        let v =
            HeaderValue::from_str(&format!("@1688169599{}", distinct_params(bytes / 5))).unwrap();
        let svc = VersionLayer::header("api-version", "2024-06-01")
            .unwrap()
            .layer(service_fn(move |_r: Request<()>| {
                let v = v.clone();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("deprecation", v)
                            .body(())
                            .unwrap(),
                    )
                }
            }));
        fastest(5, || {
            rt.block_on(async {
                let req = Request::get("http://api.example.com/v1/x")
                    .body(())
                    .unwrap();
                svc.clone().oneshot(req).await.unwrap();
            });
        })
    });
    eprintln!("Deprecation, distinct keys: {t:?}, ratio {:.1}", ratio(&t));
    assert!(ratio(&t) < 40.0, "{t:?}");
}

/// The parser itself, on an inner list of many items each with one parameter: linear (each
/// item has its own parameter list).
#[test]
fn inner_list_items_with_parameters_are_linear() {
    let t = scaling(1024, |bytes| {
        let mut v = String::from("(");
        for i in 0..bytes / 8 {
            v.push_str(&format!("a;k{} ", i % 1000));
        }
        v.push_str(");r=1");
        fastest(5, || {
            let l = sf::parse_list([v.as_bytes()]).unwrap();
            assert_eq!(l.len(), 1);
        })
    });
    eprintln!("inner list: {t:?}, ratio {:.1}", ratio(&t));
    assert!(ratio(&t) < 40.0, "{t:?}");
}

/// `Link: <i>;anchor=#a;rel=x, ...` (links not kept: only `next` is) with `next` last, on a
/// page whose own URI (the previous page's `next` link, so the server's choice) is as long as
/// the header: every anchor is resolved against the whole request URI, kept or not, so the
/// work is links × URI length. Both grow with n: 16n costs about 256 times n.
#[test]
fn link_anchors_against_a_long_request_uri_are_linear() {
    let t = scaling(4 * 1024, |bytes| {
        let base = format!("http://h.example/p?c={}", "c".repeat(bytes));
        let one = "<i>;anchor=#a;rel=x,";
        let mut v = one.repeat(bytes / one.len());
        v.push_str("</next>;rel=next");
        let h = headers("link", &v);
        fastest(3, || {
            assert_eq!(
                next_link(&h, &base).as_deref(),
                Some("http://h.example/next")
            );
        })
    });
    eprintln!("Link anchors x URI: {t:?}, ratio {:.1}", ratio(&t));
    assert!(ratio(&t) < 40.0, "{t:?}");
}

/// The same links without anchors, against the same long URIs: linear.
#[test]
fn link_without_anchors_against_a_long_request_uri_is_linear() {
    let t = scaling(4 * 1024, |bytes| {
        let base = format!("http://h.example/p?c={}", "c".repeat(bytes));
        let one = "<i>;title=ab;rel=x,";
        let mut v = one.repeat(bytes / one.len());
        v.push_str("</next>;rel=next");
        let h = headers("link", &v);
        fastest(3, || {
            assert_eq!(
                next_link(&h, &base).as_deref(),
                Some("http://h.example/next")
            );
        })
    });
    eprintln!(
        "Link without anchors, long URI: {t:?}, ratio {:.1}",
        ratio(&t)
    );
    assert!(ratio(&t) < 40.0, "{t:?}");
}

/// The absolute cost of one `RateLimit` header near what hyper's client reads by default
/// (its 400 KiB head buffer): 256 KiB of distinct parameter keys, one response.
#[test]
#[ignore = "slow: prints the time of one 256 KiB RateLimit header"]
fn one_large_ratelimit_header() {
    let v = format!("\"default\";r=5;t=1{}", distinct_params(256 * 1024 / 5));
    let h = headers("ratelimit", &v);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let t = fastest(1, || {
        assert!(pause_hint(StatusCode::OK, &h, now).is_none());
    });
    eprintln!("one 256 KiB RateLimit header: {t:?}");
    assert!(t < Duration::from_millis(100), "{t:?}");
}

/// `parse_link` keeps up to 100 links, each with its `anchor` resolved against the request URI:
/// a 2 KiB header of 100 `<i>;anchor=#a;rel=x` links and a 64 KiB request URI keep 100 copies
/// of the URI. Bytes kept, against header plus URI, at n, 4n and 16n (both growing): the
/// documented bound is "time and memory linear in the header (plus one copy of the request URI
/// per kept link: its resolved target and anchor)".
#[test]
fn parse_link_memory_is_linear_in_header_plus_a_uri_per_kept_link() {
    for bytes in [1024, 4 * 1024, 16 * 1024] {
        let base = format!("http://h.example/p?c={}", "c".repeat(bytes));
        let one = "<i>;anchor=#a;rel=x,";
        let v = one.repeat((bytes / one.len()).min(100));
        let h = headers("link", &v);
        let links = parse_link(&h, &base);
        let kept: usize = links
            .iter()
            .map(|l| {
                l.target().len()
                    + l.params()
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>()
            })
            .sum();
        let input = v.len() + base.len();
        eprintln!(
            "header {} + URI {} bytes: {} links keep {kept} bytes ({:.1}x the input)",
            v.len(),
            base.len(),
            links.len(),
            kept as f64 / input as f64
        );
        assert!(
            kept <= 8 * v.len() + 2 * links.len() * (base.len() + 2),
            "{kept} bytes for {} links",
            links.len()
        );
    }
}

/// The absolute cost of `next_link` on a page whose URI is near `http::Uri`'s limit (64 KiB,
/// set by the previous page's `next` link) and whose `Link` header is 256 KiB of anchored links.
#[test]
#[ignore = "slow: prints the time of one 256 KiB Link header against a 60 KiB URI"]
fn one_large_link_header_against_a_long_uri() {
    let base = format!("http://h.example/p?c={}", "c".repeat(60 * 1024));
    let one = "<i>;anchor=#a;rel=x,";
    let mut v = one.repeat(256 * 1024 / one.len());
    v.push_str("</next>;rel=next");
    let h = headers("link", &v);
    let t = fastest(3, || {
        assert_eq!(
            next_link(&h, &base).as_deref(),
            Some("http://h.example/next")
        );
    });
    // The same number of links without anchors: what a parse linear in the header costs.
    let mut plain = "<i>;title=#a;rel=x,".repeat(256 * 1024 / one.len());
    plain.push_str("</next>;rel=next");
    let p = headers("link", &plain);
    let baseline = fastest(3, || {
        assert_eq!(
            next_link(&p, &base).as_deref(),
            Some("http://h.example/next")
        );
    });
    eprintln!("one 256 KiB Link header, 60 KiB URI: {t:?} (without anchors {baseline:?})");
    assert!(
        t < baseline * 10 + Duration::from_millis(5),
        "{t:?} against {baseline:?}"
    );
}

/// Over the wire: `sturdy::ClientBuilder`'s default stack on a hyper-util client receives a 200
/// whose `RateLimit` header is 200 KiB of distinct parameters (hyper's client reads heads up
/// to 400 KiB). Prints the time of the call; the parse runs inside the response future, on the
/// caller's task.
#[test]
#[ignore = "slow: prints the client time of one 200 KiB RateLimit header over the wire"]
fn one_large_ratelimit_header_over_the_wire() {
    use bytes::Bytes;
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let value = format!("\"default\";r=5;t=1{}", distinct_params(200 * 1024 / 5));
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await.unwrap();
            let res = format!(
                "HTTP/1.1 200 OK\r\nratelimit: {value}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
            );
            s.write_all(res.as_bytes()).await.unwrap();
            let _ = s.read(&mut buf).await;
        });
        let http = hyper_util::client::legacy::Client::builder(
            hyper_util::rt::TokioExecutor::new(),
        )
        .build_http::<Full<Bytes>>();
        let client = sturdy::ClientBuilder::new().build(http);
        let req = Request::get(format!("http://{addr}/x"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let start = Instant::now();
        let res = client.oneshot(req).await.unwrap();
        let took = start.elapsed();
        eprintln!("200 KiB RateLimit over the wire: {} after {took:?}", res.status());
        assert_eq!(res.status(), StatusCode::OK);
        assert!(took < Duration::from_millis(100), "{took:?}");
    });
}
