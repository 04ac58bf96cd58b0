//! Review of the origin comparison for next links (RFC 6454: scheme and host in lowercase,
//! default ports): what it treats as one origin, and links built to fool it.

use crate::support;
use support::{api, page};

use futures_util::TryStreamExt;
use sturdy_paginate::{LinkHeader, Paginate};

/// Walks from `start`, whose first page links to `next`; `Ok(pages fetched)` or the error.
async fn walk(start: &str, next: &str) -> Result<usize, String> {
    let first = http::Uri::try_from(start).unwrap();
    let first_pq = first.path_and_query().unwrap().as_str().to_owned();
    let link = format!("<{next}>; rel=\"next\"");
    let (svc, count) = api(move |pq| {
        if pq == first_pq {
            page("[1]", Some(&link))
        } else {
            page("[2]", None)
        }
    });
    let pager = Paginate::new(svc, start, LinkHeader::new("")).map_err(|e| e.to_string())?;
    match pager.items().try_collect::<Vec<serde_json::Value>>().await {
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
async fn one_origin_whatever_the_case_and_the_default_port() {
    for (start, next) in [
        ("http://API.example.com/x", "http://api.example.com:80/p2"),
        ("http://api.example.com:80/x", "http://Api.Example.Com/p2"),
        (
            "https://api.example.com/x",
            "https://api.example.com:443/p2",
        ),
        ("HTTPS://api.example.com/x", "https://api.example.com/p2"),
        ("http://[::1]/x", "http://[::1]:80/p2"),
        ("http://[::1]:8080/x", "/p2"),
        ("http://api.example.com/x", "//api.example.com/p2"),
        (
            "http://api.example.com/x",
            "http://user:pw@api.example.com/p2",
        ),
    ] {
        let r = walk(start, next).await;
        assert_eq!(r, Ok(2), "{start} -> {next}");
    }
}

#[tokio::test]
async fn another_scheme_port_or_host_is_refused_however_it_is_written() {
    for (start, next) in [
        (
            "http://api.example.com:80/x",
            "https://api.example.com:80/p2",
        ),
        ("https://api.example.com/x", "http://api.example.com:443/p2"),
        ("http://api.example.com/x", "https://api.example.com/p2"),
        ("http://api.example.com/x", "http://api.example.com:8080/p2"),
        ("http://api.example.com/x", "http://api.example.com:0/p2"),
        (
            "http://api.example.com/x",
            "http://api.example.com@evil.example/p2",
        ),
        (
            "http://api.example.com/x",
            "http://api.example.com:80@evil.example/p2",
        ),
        ("http://api.example.com/x", "//evil.example/p2"),
        (
            "http://api.example.com/x",
            "http://evil.example/p2#@api.example.com",
        ),
        (
            "http://api.example.com/x",
            "http://api.example.com.evil.example/p2",
        ),
        ("http://[::1]/x", "http://[::2]/p2"),
        ("http://[::1]/x", "http://127.0.0.1/p2"),
    ] {
        let r = walk(start, next).await;
        assert!(refused(&r), "{start} -> {next}: {r:?}");
    }
}
