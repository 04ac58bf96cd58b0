//! coalesce.md, "Identical: same method, same URI ..., same headers", "Keys are compared in
//! full (not by hash)", and `with_key_headers`: requests whose headers differ but could read the
//! same once written one after the other (values holding separators, values moved from one
//! header to another, an empty value against no header) must never share a response. Paused
//! time; the inner service answers with the headers it received.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ACCEPT, AUTHORIZATION};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::BoxError;
use tower::{Layer, ServiceExt};

type Req = Request<Full<Bytes>>;

fn build(uri: &str, headers: &[(&str, &[u8])]) -> Req {
    let mut r = Request::get(uri).body(Full::default()).unwrap();
    for (n, v) in headers {
        r.headers_mut().append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_bytes(v).unwrap(),
        );
    }
    r
}

/// Runs `a` and `b` at the same moment through `layer`; returns the two bodies (each the headers
/// the inner service saw for that caller) and how many calls the inner service got.
async fn pair(layer: CoalesceLayer, a: Req, b: Req) -> (String, String, u32) {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let api = tower::service_fn(move |r: Req| {
        c.fetch_add(1, Ordering::SeqCst);
        let mut seen = String::new();
        for (n, v) in r.headers() {
            seen.push_str(&format!("{n}={:?};", v.as_bytes()));
        }
        seen.push_str(&format!("uri={}", r.uri()));
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(seen)))
        }
    });
    let svc = layer.layer(api);
    let fa = svc.clone().oneshot(a);
    let fb = svc.clone().oneshot(b);
    let (ra, rb) = tokio::join!(fa, fb);
    let ba = ra.unwrap().into_body().collect().await.unwrap().to_bytes();
    let bb = rb.unwrap().into_body().collect().await.unwrap().to_bytes();
    (
        String::from_utf8_lossy(&ba).into_owned(),
        String::from_utf8_lossy(&bb).into_owned(),
        calls.load(Ordering::SeqCst),
    )
}

#[tokio::test(start_paused = true)]
async fn client26_header_values_holding_separators_never_share() {
    let uri = "http://api.test/r";
    let mut shared = Vec::new();
    let seps: Vec<&[u8]> = vec![
        b":", b": ", b"=", b",", b", ", b";", b"\t", b" ", b"|", b"&", b"/", b"\x7e", b"\xff",
    ];
    for s1 in &seps {
        for s2 in &seps {
            // {x-a: 1, x-b: 2} against {x-a: "1<s1>x-b<s2>2"}.
            let mut joined = b"1".to_vec();
            joined.extend_from_slice(s1);
            joined.extend_from_slice(b"x-b");
            joined.extend_from_slice(s2);
            joined.extend_from_slice(b"2");
            let a = build(uri, &[("x-a", b"1"), ("x-b", b"2")]);
            let b = build(uri, &[("x-a", &joined)]);
            let (ba, bb, n) = pair(CoalesceLayer::new(), a, b).await;
            if n != 2 || ba == bb {
                shared.push(format!("{:?}", String::from_utf8_lossy(&joined)));
            }
        }
    }
    assert!(
        shared.is_empty(),
        "shared a response with {{x-a: 1, x-b: 2}}: {shared:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn client26_values_moved_between_headers_never_share() {
    let uri = "http://api.test/r";
    let cases: Vec<(Vec<(&str, &[u8])>, Vec<(&str, &[u8])>)> = vec![
        (
            vec![("x-a", b"12"), ("x-b", b"3")],
            vec![("x-a", b"1"), ("x-b", b"23")],
        ),
        (vec![("x-a", b"")], vec![]),
        (vec![("x-a", b""), ("x-b", b"1")], vec![("x-b", b"1")]),
        (
            vec![("x-a", b"1"), ("x-a", b"2")],
            vec![("x-a", b"2"), ("x-a", b"1")],
        ),
        (vec![("x-a", b"1"), ("x-a", b"2")], vec![("x-a", b"12")]),
        (vec![("x-a", b"1"), ("x-a", b"")], vec![("x-a", b"1")]),
        (vec![("x-ab", b"c")], vec![("x-a", b"bc")]),
    ];
    let mut shared = Vec::new();
    for (ha, hb) in cases {
        let (ba, bb, n) = pair(CoalesceLayer::new(), build(uri, &ha), build(uri, &hb)).await;
        if n != 2 || ba == bb {
            shared.push(format!("{ha:?} ~ {hb:?}"));
        }
    }
    assert!(
        shared.is_empty(),
        "different headers shared one response: {shared:#?}"
    );
}

/// `with_key_headers([AUTHORIZATION, ACCEPT])`: a value in one named header is not the same as
/// that value in the other, and a split that reads the same end to end is not either.
#[tokio::test(start_paused = true)]
async fn client26_key_headers_are_told_apart() {
    let uri = "http://api.test/r";
    let cases: Vec<(Vec<(&str, &[u8])>, Vec<(&str, &[u8])>)> = vec![
        (
            vec![("authorization", b"Bearer a")],
            vec![("accept", b"Bearer a")],
        ),
        (
            vec![("authorization", b"Bearer ab"), ("accept", b"c")],
            vec![("authorization", b"Bearer a"), ("accept", b"bc")],
        ),
        (vec![("authorization", b"")], vec![]),
        (
            vec![
                ("authorization", b"Bearer a"),
                ("authorization", b"Bearer b"),
            ],
            vec![("authorization", b"Bearer a")],
        ),
    ];
    let mut shared = Vec::new();
    for (ha, hb) in cases {
        let layer = CoalesceLayer::new().with_key_headers([AUTHORIZATION, ACCEPT]);
        let (ba, bb, n) = pair(layer, build(uri, &ha), build(uri, &hb)).await;
        if n != 2 || ba == bb {
            shared.push(format!("{ha:?} ~ {hb:?}"));
        }
    }
    assert!(shared.is_empty(), "shared: {shared:#?}");
}

/// URIs that differ only where a writer might join them: a `?` in the path or the query, the
/// scheme, an encoded slash.
#[tokio::test(start_paused = true)]
async fn client26_uris_that_differ_never_share() {
    let cases = [
        ("http://api.test/r?a=1", "http://api.test/r%3Fa=1"),
        ("https://api.test/r", "http://api.test/r"),
        ("http://api.test/a/b", "http://api.test/a%2Fb"),
    ];
    let mut shared = Vec::new();
    for (a, b) in cases {
        let (ba, bb, n) = pair(CoalesceLayer::new(), build(a, &[]), build(b, &[])).await;
        if n != 2 || ba == bb {
            shared.push(format!("{a} ~ {b}"));
        }
    }
    assert!(shared.is_empty(), "shared: {shared:?}");
}
