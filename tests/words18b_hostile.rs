//! Hostile values against documented promises: problem JSON for keys full of quotes and
//! backslashes, next cursors and links longer than `MAX_CURSOR_LEN`, and `expires_in` at the
//! edge of what JSON can say ("huge => 24 h").
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use sturdy::auth::ClientCredentials;
use sturdy::idempotency::server::{problem, ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::paginate::{JsonCursor, LinkHeader, Paginate, MAX_CURSOR_LEN};
use tower::ServiceExt;

/// "The layer's own answers are RFC 9457 problem JSON": valid JSON whatever visible ASCII the
/// key holds.
#[tokio::test(start_paused = true)]
async fn problem_json_for_any_key() {
    let app = Router::new()
        .route(
            "/orders",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                StatusCode::CREATED
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    const KEY: &str = r#"a"},"x":"\u0000\\"#;
    let req = |body: &'static str| {
        Request::post("/orders")
            .header("idempotency-key", KEY)
            .body(Body::from(body))
            .unwrap()
    };
    let a = app.clone();
    let first = tokio::spawn(async move { a.oneshot(req("one")).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut seen = vec![];
    for body in ["one", "two"] {
        let res = app.clone().oneshot(req(body)).await.unwrap();
        let status = res.status();
        let b = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_else(|e| {
            panic!("{status}: not JSON ({e}): {}", String::from_utf8_lossy(&b))
        });
        seen.push((status, v["type"].as_str().unwrap().to_owned()));
    }
    assert_eq!(
        seen[0],
        (StatusCode::CONFLICT, problem::IN_FLIGHT.to_owned())
    );
    assert_eq!(seen[1].0, StatusCode::UNPROCESSABLE_ENTITY);
    first.await.unwrap();
}

fn cursor_api(
    next_len: usize,
    link: bool,
) -> (
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Arc<AtomicUsize>,
) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let svc = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        let next = "c".repeat(next_len);
        let res = if link {
            Response::builder()
                .header(
                    "link",
                    format!("<http://api.test/items?after={next}&i={i}>; rel=\"next\""),
                )
                .body(Full::new(Bytes::from(
                    json!([i * 2, i * 2 + 1]).to_string(),
                )))
                .unwrap()
        } else {
            Response::new(Full::new(Bytes::from(
                json!({"data": [i * 2, i * 2 + 1], "next": format!("{next}{i}")}).to_string(),
            )))
        };
        async move { Ok::<_, std::convert::Infallible>(res) }
    });
    (svc, n)
}

/// "A cursor is at most 16 KiB (`MAX_CURSOR_LEN`)" and "the cursor is opaque and resumes exactly
/// after the last item returned": a server whose next cursor (or next link) is long must give
/// either a cursor `page()` takes back, or a clear error, never one it then refuses.
#[tokio::test]
async fn long_server_cursors() {
    for (len, link) in [
        (12_000usize, false),
        (12_000, true),
        (30_000, false),
        (30_000, true),
    ] {
        let (svc, _) = cursor_api(len, link);
        let p = if link {
            Paginate::new(svc, "http://api.test/items", LinkHeader::new(""))
                .map(|p| either(p, None))
        } else {
            Paginate::new(
                svc,
                "http://api.test/items",
                JsonCursor::new("/data", "/next"),
            )
            .map(|p| either(None, p))
        }
        .unwrap();
        let first = p.page(None, 2).await;
        match first {
            Ok(page) => {
                let c = page.next_cursor.expect("more pages");
                assert!(
                    c.len() <= MAX_CURSOR_LEN,
                    "{len} link={link}: a cursor of {} bytes",
                    c.len()
                );
                let second = p.page(Some(&c), 2).await;
                assert!(
                    second.is_ok(),
                    "{len} link={link}: its own cursor refused: {:?}",
                    second.err()
                );
            }
            Err(e) => {
                let m = e.to_string();
                assert!(
                    m.len() < 2_000,
                    "{len} link={link}: {} bytes of message",
                    m.len()
                );
                assert!(
                    m.contains("cursor") || m.contains("long"),
                    "{len} link={link}: {m}"
                );
            }
        }
    }
}

enum Either2<A, B> {
    L(A),
    R(B),
}
fn either<A, B>(a: impl Into<Option<A>>, b: impl Into<Option<B>>) -> Either2<A, B> {
    match (a.into(), b.into()) {
        (Some(a), _) => Either2::L(a),
        (_, Some(b)) => Either2::R(b),
        _ => unreachable!(),
    }
}
impl Either2<Paginate<LinkHeader>, Paginate<JsonCursor>> {
    async fn page(
        &self,
        c: Option<&str>,
        n: usize,
    ) -> Result<sturdy::paginate::BoundedPage, sturdy::core::Error> {
        match self {
            Self::L(p) => p.page(c, n).await,
            Self::R(p) => p.page(c, n).await,
        }
    }
}

/// "`expires_in` missing => 1 h, zero or negative => a clear error, huge => 24 h": a number
/// too large for a double, as JSON allows, is huge.
#[tokio::test(start_paused = true)]
async fn expires_in_beyond_a_double() {
    let mut bad = vec![];
    for expires in [
        "1e400",
        "123456789012345678901234567890",
        "\"1e400\"",
        "1.7976931348623157e308",
    ] {
        let body =
            format!(r#"{{"access_token":"t","token_type":"Bearer","expires_in":{expires}}}"#);
        let ep = tower::service_fn(move |_r: Request<Full<Bytes>>| {
            let b = body.clone();
            async move { Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(b)))) }
        });
        let c = ClientCredentials::new(ep, "http://auth.test/token", "id", "s").unwrap();
        match c.get().await {
            Ok(t) => {
                let left = t.expires_at().unwrap() - tokio::time::Instant::now();
                if left != Duration::from_secs(86_400) {
                    bad.push(format!("expires_in {expires}: lifetime {left:?}"));
                }
            }
            Err(e) => bad.push(format!("expires_in {expires}: {e}")),
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// "A next link to another origin is refused unless `.with_foreign_origin_allowed(true)`" and
/// "relative links resolved": network-path, userinfo and scheme tricks are other origins; the
/// same origin spelled otherwise is followed.
#[tokio::test]
async fn next_link_origin_tricks() {
    for (link, followed) in [
        ("//evil.test/items?page=2", false),
        ("http://api.test@evil.test/items?page=2", false),
        ("https://api.test/items?page=2", false),
        ("http://api.test:8080/items?page=2", false),
        ("http://evil.test/items?page=2", false),
        ("?page=2", true),
        ("/items?page=2", true),
        ("//api.test/items?page=2", true),
        ("http://API.test:80/items?page=2", true),
    ] {
        let log = Arc::new(std::sync::Mutex::new(vec![]));
        let l = log.clone();
        let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
            let first = l.lock().unwrap().is_empty();
            l.lock().unwrap().push(req.uri().to_string());
            let mut b = Response::builder();
            if first {
                b = b.header("link", format!("<{link}>; rel=\"next\""));
            }
            let res = b.body(Full::new(Bytes::from_static(b"[1]"))).unwrap();
            async move { Ok::<_, std::convert::Infallible>(res) }
        });
        let p = Paginate::new(
            svc,
            "http://api.test/items",
            LinkHeader::new("").without_limit_param(),
        )
        .unwrap();
        let mut s = p.items();
        let mut err = None;
        use futures_util::TryStreamExt;
        loop {
            match s.try_next().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let log = log.lock().unwrap();
        if followed {
            assert_eq!(log.len(), 2, "{link}: not followed: {err:?}");
            assert!(err.is_none(), "{link}: {err:?}");
        } else {
            assert_eq!(log.len(), 1, "{link}: followed to {:?}", log.get(1));
            let e = err.unwrap_or_else(|| panic!("{link}: no error"));
            assert_eq!(
                e.kind(),
                &sturdy::core::ErrorKind::Pagination,
                "{link}: {e}"
            );
        }
    }
}
