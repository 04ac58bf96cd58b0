//! docs/guides/coalesce.md, "Identical: same method, same URI (scheme, authority, path and
//! query), same headers ... callers with different credentials never share a response", fed
//! requests built to look alike: credentials in the URI's user info, header values outside
//! visible ASCII, header values that spell out other headers, a header present but empty.
//! Paused time, in process.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::coalesce::CoalesceLayer;
use tower::{service_fn, Layer, ServiceExt};

/// The echo a server would base its answer on: the URI and every header, as received.
fn echo_of(req: &Request<Full<Bytes>>) -> Vec<u8> {
    let mut out = req.uri().to_string().into_bytes();
    for (k, v) in req.headers() {
        out.push(b'\n');
        out.extend_from_slice(k.as_str().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// Sends `reqs` at once through a coalescing layer over an API that answers after 50 ms with the
/// echo of what it received. Returns the number of calls the API saw; asserts every caller got
/// the echo of its own request.
async fn burst(reqs: Vec<Request<Full<Bytes>>>) -> usize {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = service_fn(move |req: Request<Full<Bytes>>| {
        c.fetch_add(1, Ordering::SeqCst);
        let echo = echo_of(&req);
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(echo))))
        }
    });
    let svc = CoalesceLayer::new().layer(api);
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let want = echo_of(&r);
            let svc = svc.clone();
            tokio::spawn(async move {
                let res = tokio::time::timeout(Duration::from_secs(5), svc.oneshot(r))
                    .await
                    .expect("no hang")
                    .unwrap();
                let got = res.into_body().collect().await.unwrap().to_bytes();
                (want, got)
            })
        })
        .collect();
    for t in tasks {
        let (want, got) = t.await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "a caller received the response to another request"
        );
    }
    calls.load(Ordering::SeqCst)
}

fn get(uri: &str, headers: &[(&str, HeaderValue)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(uri);
    for (k, v) in headers {
        b = b.header(*k, v.clone());
    }
    b.body(Full::default()).unwrap()
}

fn v(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap()
}

/// "same URI (scheme, authority, path and query)": the authority holds the user info, which is
/// a credential; two users must never share a response.
#[tokio::test(start_paused = true)]
async fn callers_with_different_credentials_in_the_uri_do_not_share() {
    let n = burst(vec![
        get("http://alice:pw1@api.example.com/me", &[]),
        get("http://bob:pw2@api.example.com/me", &[]),
    ])
    .await;
    assert_eq!(n, 2);
    let n = burst(vec![
        get("http://alice:pw1@api.example.com/me", &[]),
        get("http://api.example.com/me", &[]),
    ])
    .await;
    assert_eq!(n, 2);
    let n = burst(vec![
        get("http://api.example.com/me", &[]),
        get("https://api.example.com/me", &[]),
    ])
    .await;
    assert_eq!(n, 2);
}

/// Header values may hold bytes above 0x7F (`HeaderValue::from_bytes` takes them): two tokens
/// that differ only there are two credentials.
#[tokio::test(start_paused = true)]
async fn credentials_that_differ_outside_visible_ascii_do_not_share() {
    let pairs: [(&[u8], &[u8]); 3] = [
        (b"Bearer \xff\xfe", b"Bearer \xfe\xff"),
        (b"Bearer t\xc3\xa9", b"Bearer t\xc3\xa8"),
        (b"Bearer \x80", b"Bearer \x81"),
    ];
    for (a, b) in pairs {
        for name in ["authorization", "cookie", "x-api-key"] {
            let n = burst(vec![
                get(
                    "http://api.example.com/me",
                    &[(name, HeaderValue::from_bytes(a).unwrap())],
                ),
                get(
                    "http://api.example.com/me",
                    &[(name, HeaderValue::from_bytes(b).unwrap())],
                ),
            ])
            .await;
            assert_eq!(n, 2, "{name}: {a:?} vs {b:?}");
        }
    }
}

/// One header whose value spells out two headers is not the same request as those two headers;
/// a header with an empty value is not the same as none; a name and value split differently is
/// not the same header.
#[tokio::test(start_paused = true)]
async fn header_values_that_spell_out_other_headers_do_not_share() {
    for sep1 in [":", ": ", "=", "\t", " ", ""] {
        for sep2 in ["\t", " ", ",", ";", "&", "|", ", ", "; "] {
            let joined = format!("Bearer a{sep2}cookie{sep1}session=b");
            let n = burst(vec![
                get(
                    "http://api.example.com/me",
                    &[("authorization", v("Bearer a")), ("cookie", v("session=b"))],
                ),
                get(
                    "http://api.example.com/me",
                    &[("authorization", v(&joined))],
                ),
            ])
            .await;
            assert_eq!(n, 2, "{joined:?}");
        }
    }
    let n = burst(vec![
        get("http://api.example.com/me", &[("x-api-keya", v("b"))]),
        get("http://api.example.com/me", &[("x-api-key", v("ab"))]),
    ])
    .await;
    assert_eq!(n, 2);
    let n = burst(vec![
        get("http://api.example.com/me", &[("x-api-key", v(""))]),
        get("http://api.example.com/me", &[]),
    ])
    .await;
    assert_eq!(n, 2);
    // The query and a header: the boundary between the URI and the headers.
    let n = burst(vec![
        get("http://api.example.com/me?a=1", &[("x-b", v("2"))]),
        get("http://api.example.com/me?a=1x-b2", &[]),
    ])
    .await;
    assert_eq!(n, 2);
}

/// Identical requests still share one call (the tests above are not passing for a layer that
/// coalesces nothing).
#[tokio::test(start_paused = true)]
async fn identical_requests_with_odd_values_share_one_call() {
    let odd = HeaderValue::from_bytes(b"Bearer \xff\tz").unwrap();
    let n = burst(
        (0..4)
            .map(|_| {
                get(
                    "http://alice:pw1@api.example.com/me?q=%20",
                    &[("authorization", odd.clone())],
                )
            })
            .collect(),
    )
    .await;
    assert_eq!(n, 1);
}
