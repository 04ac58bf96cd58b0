#![cfg(feature = "full")]
//! s51a: the numbers the docs state for the server-side pieces (idempotency keys, bodies and
//! TTLs; webhook tolerance, ids, bodies and signature entries) and for pagination, versions,
//! `Link` bounds and `human_duration`, each observed at its boundary through the public API,
//! with hostile values (zero, `Duration::MAX`, huge headers) beside them.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::core::clock::ManualClock;
use sturdy::core::headers::{parse_link, MAX_LINKS, MAX_LINK_PARAMS};
use sturdy::core::human_duration;
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::paginate::{JsonCursor, Paginate, MAX_CURSOR_LEN};
use sturdy::webhook::{sign_standard, MemoryQueue, StandardWebhooks, WebhookReceiver};
use tower::{Layer, ServiceExt};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Idempotency server (idempotency.md)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Handler {
    runs: Arc<AtomicUsize>,
}

impl Handler {
    fn service(
        &self,
        delay: Duration,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + 'static {
        let runs = self.runs.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let runs = runs.clone();
            async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                runs.fetch_add(1, Ordering::SeqCst);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(201)
                        .body(Full::new(Bytes::from(format!("len {}", body.len()))))
                        .unwrap(),
                )
            }
        })
    }
}

fn keyed(key: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::post("http://api.test/orders")
        .header("idempotency-key", HeaderValue::from_str(key).unwrap())
        .body(Full::new(body))
        .unwrap()
}

async fn problem_type<B>(res: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    v["type"].as_str().unwrap_or("").to_owned()
}

/// idempotency.md: "a key that is not 1 to 255 visible ASCII characters (sent bare, `k`, or as a
/// structured-field string, `"k"`: the two name the same key on two requests) | 400,
/// `…/idempotency-key-invalid`".
#[tokio::test]
async fn s51a_idempotency_key_length_255_ok_256_refused() {
    let h = Handler::default();
    let svc = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .layer(h.service(Duration::ZERO));
    let k255 = "k".repeat(255);
    let k256 = "k".repeat(256);
    let res = svc
        .clone()
        .oneshot(keyed(&k255, Bytes::from_static(b"a")))
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "255 characters");
    for bad in [
        k256.clone(),
        format!("\"{k256}\""),
        "a b".to_owned(),
        "\"\"".to_owned(),
        " ".to_owned(),
    ] {
        let res = svc
            .clone()
            .oneshot(keyed(&bad, Bytes::from_static(b"a")))
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "key {bad:?}");
        assert_eq!(
            problem_type(res).await,
            "https://example.invalid/sturdy/problems/idempotency-key-invalid",
            "key {bad:?}"
        );
    }
    // The quoted form of 255 characters names the same key as the bare one: replayed.
    let res = svc
        .clone()
        .oneshot(keyed(&format!("\"{k255}\""), Bytes::from_static(b"a")))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(
        res.headers()
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(h.runs.load(Ordering::SeqCst), 1);
}

/// idempotency.md: "body over the limit (1 MiB, `with_body_limit` ...) | 413,
/// `…/request-body-too-large`".
#[tokio::test]
async fn s51a_idempotency_body_limit_1mib_exactly() {
    let h = Handler::default();
    let svc = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .layer(h.service(Duration::ZERO));
    let res = svc
        .clone()
        .oneshot(keyed("k1", Bytes::from(vec![b'x'; MIB])))
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "exactly 1 MiB");
    let res = svc
        .clone()
        .oneshot(keyed("k2", Bytes::from(vec![b'x'; MIB + 1])))
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(
        problem_type(res).await,
        "https://example.invalid/sturdy/problems/request-body-too-large"
    );
    assert_eq!(h.runs.load(Ordering::SeqCst), 1);
}

/// idempotency.md: "repeat while the first runs | 409, `Retry-After: 1`, problem type
/// `…/idempotency-key-in-flight`"; the problem JSON quoted in the guide.
#[tokio::test(start_paused = true)]
async fn s51a_idempotency_in_flight_409_words() {
    let h = Handler::default();
    let svc = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .layer(h.service(secs(5)));
    let first = tokio::spawn(
        svc.clone()
            .oneshot(keyed("same", Bytes::from_static(b"{}"))),
    );
    tokio::time::sleep(secs(1)).await;
    let res = svc
        .clone()
        .oneshot(keyed("same", Bytes::from_static(b"{}")))
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(
        res.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(
        res.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/problem+json"[..])
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "type": "https://example.invalid/sturdy/problems/idempotency-key-in-flight",
            "title": "A request is outstanding for this Idempotency-Key",
            "status": 409,
            "detail": "the first request with this key is still running; retry after a while with the same key"
        })
    );
    assert_eq!(first.await.unwrap().unwrap().status(), 201);
}

/// idempotency.md: "its response is stored 24 h". Just before 24 h: replayed; just after: the
/// handler runs again.
#[tokio::test(start_paused = true)]
async fn s51a_idempotency_ttl_24h_boundary() {
    let h = Handler::default();
    let svc = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .layer(h.service(Duration::ZERO));
    let body = Bytes::from_static(b"{}");
    assert_eq!(
        svc.clone()
            .oneshot(keyed("t", body.clone()))
            .await
            .unwrap()
            .status(),
        201
    );
    tokio::time::advance(secs(24 * 3600) - secs(1)).await;
    let res = svc.clone().oneshot(keyed("t", body.clone())).await.unwrap();
    assert!(
        res.headers().contains_key("idempotent-replayed"),
        "replayed before 24 h"
    );
    assert_eq!(h.runs.load(Ordering::SeqCst), 1);
    tokio::time::advance(secs(2)).await;
    let res = svc.clone().oneshot(keyed("t", body)).await.unwrap();
    assert!(
        !res.headers().contains_key("idempotent-replayed"),
        "expired after 24 h"
    );
    assert_eq!(h.runs.load(Ordering::SeqCst), 2);
}

/// idempotency.md: "`with_ttl` and `with_lease` return an error for a zero TTL or a lease under
/// 1 ms, and `MemoryStore::new(0)` for a store of no entries"; RELIABILITY.md: durations set to
/// `Duration::MAX` are "read as about 30 years from now; never a panic".
#[tokio::test]
async fn s51a_idempotency_setting_boundaries_and_max() {
    let layer = || IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    assert!(layer().with_ttl(Duration::ZERO).is_err());
    assert!(layer().with_ttl(Duration::from_nanos(1)).is_ok());
    assert!(layer().with_lease(Duration::from_micros(999)).is_err());
    assert!(layer().with_lease(Duration::from_millis(1)).is_ok());
    assert!(MemoryStore::new(0).is_err());
    assert!(MemoryStore::new(1).is_ok());
    assert!(MemoryStore::default().with_max_bytes(0).is_err());
    let h = Handler::default();
    let svc = layer()
        .with_ttl(Duration::MAX)
        .unwrap()
        .with_lease(Duration::MAX)
        .unwrap()
        .layer(h.service(Duration::ZERO));
    for _ in 0..2 {
        let res = svc
            .clone()
            .oneshot(keyed("m", Bytes::from_static(b"{}")))
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    assert_eq!(h.runs.load(Ordering::SeqCst), 1);
}

/// Hostile: a 100 KB `Idempotency-Key` header: 400 quickly, the handler never runs.
#[tokio::test]
async fn s51a_idempotency_100kb_key_is_refused() {
    let h = Handler::default();
    let svc = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .layer(h.service(Duration::ZERO));
    let big = "k".repeat(100_000);
    let start = tokio::time::Instant::now();
    let res = svc
        .oneshot(keyed(&big, Bytes::from_static(b"{}")))
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert!(start.elapsed() < secs(2));
    assert_eq!(h.runs.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------
// Webhooks (webhooks.md)
// ---------------------------------------------------------------------------------------------

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const T0: i64 = 1_796_428_800; // 2026-12-05T00:00:00Z

fn standard_req(id: &str, ts: i64, body: &[u8], sig: Option<String>) -> Request<Full<Bytes>> {
    let sig = sig.unwrap_or_else(|| sign_standard(WHSEC, id, ts, body).unwrap());
    Request::post("http://hooks.test/standard")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap()
}

fn receiver_at(
    now: SystemTime,
) -> (
    WebhookReceiver<MemoryQueue>,
    sturdy::webhook::MemoryReceiver,
) {
    let (queue, events) = MemoryQueue::new(1000);
    let rx = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), queue)
        .with_clock(Arc::new(ManualClock::at(now)));
    (rx, events)
}

async fn text(res: Response<Full<Bytes>>) -> (u16, String) {
    let s = res.status().as_u16();
    let b = res.into_body().collect().await.unwrap().to_bytes();
    (s, String::from_utf8_lossy(&b).into_owned())
}

/// webhooks.md: "a signed timestamp within the tolerance \[5 minutes, both directions\]"; "ages are
/// compared in whole seconds: a copy 1.9 s past a 1 s tolerance is "1 s old" and passes".
#[tokio::test]
async fn s51a_webhook_tolerance_300s_both_directions() {
    let at = |offset_ms: i64| {
        let base = UNIX_EPOCH + secs(T0 as u64);
        if offset_ms >= 0 {
            base + Duration::from_millis(offset_ms as u64)
        } else {
            base - Duration::from_millis((-offset_ms) as u64)
        }
    };
    for (clock_ms, want) in [
        (300_000i64, 200u16),
        (300_900, 200),
        (301_000, 401),
        (-300_000, 200),
        (-301_000, 401),
    ] {
        let (rx, _events) = receiver_at(at(clock_ms));
        let id = format!("msg_{clock_ms}");
        let res = rx
            .oneshot(standard_req(&id, T0, b"{}", None))
            .await
            .unwrap();
        assert_eq!(res.status(), want, "clock at T0 {clock_ms:+} ms");
    }
}

/// webhooks.md: "`webhook-id` (ASCII, 1 to 256 bytes, without a `.`, else 400 ...)";
/// RELIABILITY.md "ids at most 256 bytes".
#[tokio::test]
async fn s51a_webhook_id_256_ok_257_refused() {
    let now = UNIX_EPOCH + secs(T0 as u64);
    let (rx, _events) = receiver_at(now);
    let ok = "i".repeat(256);
    let res = rx
        .clone()
        .oneshot(standard_req(&ok, T0, b"{}", None))
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "256 bytes");
    for bad in ["i".repeat(257), "a.b".to_owned()] {
        let res = rx
            .clone()
            .oneshot(standard_req(&bad, T0, b"{}", None))
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "id of {} bytes", bad.len());
    }
}

/// webhooks.md: "**Body**: read up to the limit \[1 MiB\]; past it, 413"; "Every rejection
/// answers a short generic text (`forbidden`, `invalid signature`, `payload too large`)".
#[tokio::test]
async fn s51a_webhook_body_1mib_and_rejection_words() {
    let now = UNIX_EPOCH + secs(T0 as u64);
    let (rx, _events) = receiver_at(now);
    let body = vec![b' '; MIB];
    let res = rx
        .clone()
        .oneshot(standard_req("big1", T0, &body, None))
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "exactly 1 MiB");
    let body = vec![b' '; MIB + 1];
    let (s, t) = text(
        rx.clone()
            .oneshot(standard_req("big2", T0, &body, None))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, t.as_str()), (413, "payload too large"));
    let bad = sign_standard(WHSEC, "other", T0, b"{}").unwrap();
    let (s, t) = text(
        rx.clone()
            .oneshot(standard_req("sig", T0, b"{}", Some(bad)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, t.as_str()), (401, "invalid signature"));
}

/// webhooks.md: "only the first `MAX_SIGNATURES` (16) `v1` entries of a Standard Webhooks ...
/// header are considered; the rest are ignored."
#[tokio::test]
async fn s51a_webhook_signature_entries_16th_counts_17th_ignored() {
    assert_eq!(sturdy::webhook::MAX_SIGNATURES, 16);
    let now = UNIX_EPOCH + secs(T0 as u64);
    let (rx, _events) = receiver_at(now);
    let wrong = sign_standard(WHSEC, "zzz", T0, b"{}").unwrap();
    for (n_wrong, want) in [(15usize, 200u16), (16, 401)] {
        let id = format!("sig{n_wrong}");
        let right = sign_standard(WHSEC, &id, T0, b"{}").unwrap();
        let mut entries = vec![wrong.clone(); n_wrong];
        entries.push(right);
        let res = rx
            .clone()
            .oneshot(standard_req(&id, T0, b"{}", Some(entries.join(" "))))
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            want,
            "the right entry after {n_wrong} wrong ones"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Pagination (paginate.md)
// ---------------------------------------------------------------------------------------------

/// A JSON cursor API: `?limit=n` gives n items (and a next cursor); logs the query of each page.
fn cursor_api(
    queries: Arc<Mutex<Vec<String>>>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        let queries = queries.clone();
        async move {
            let q = req.uri().query().unwrap_or("").to_owned();
            queries.lock().unwrap().push(q.clone());
            let limit: usize = q
                .split('&')
                .find_map(|p| p.strip_prefix("limit="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(10);
            let page: usize = q
                .split('&')
                .find_map(|p| p.strip_prefix("cursor=c"))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let items: Vec<usize> = (0..limit).map(|i| page * 1000 + i).collect();
            let body = serde_json::json!({"data": items, "next_cursor": format!("c{}", page + 1)});
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body.to_string()))))
        }
    })
}

/// paginate.md: "`with_page_size` | the strategy's in walks; `min(limit, 100)` in `page()`";
/// `page` rustdoc: "A `limit` of 0 reads as 1, and one above `with_max_items` as that bound".
#[tokio::test]
async fn s51a_page_size_is_min_limit_100() {
    let queries = Arc::new(Mutex::new(Vec::new()));
    let pager = Paginate::new(
        cursor_api(queries.clone()),
        "http://api.test/items",
        JsonCursor::new("/data", "/next_cursor"),
    )
    .unwrap();
    for (limit, asked, got) in [
        (0usize, "limit=1", 1usize),
        (1, "limit=1", 1),
        (99, "limit=99", 99),
        (100, "limit=100", 100),
        (101, "limit=100", 101),
    ] {
        queries.lock().unwrap().clear();
        let page = pager.page(None, limit).await.unwrap();
        assert_eq!(page.items.len(), got, "limit {limit}");
        let q = queries.lock().unwrap().clone();
        assert!(q[0].contains(asked), "limit {limit}: {q:?}");
        assert!(page.has_more);
    }
    let small = Paginate::builder(
        cursor_api(queries.clone()),
        "http://api.test/items",
        JsonCursor::new("/data", "/next_cursor"),
    )
    .with_max_items(5)
    .build()
    .unwrap();
    let page = small.page(None, 10).await.unwrap();
    assert_eq!(page.items.len(), 5, "a limit above max_items reads as it");
}

/// paginate.md: "A cursor is at most 16 KiB (`MAX_CURSOR_LEN`)"; a forged cursor is "refused
/// before any request is sent", kind `Pagination`. Hostile: a 100 KB cursor, an empty one.
#[tokio::test]
async fn s51a_cursor_bounds_and_hostile_cursors() {
    assert_eq!(MAX_CURSOR_LEN, 16 * 1024);
    let queries = Arc::new(Mutex::new(Vec::new()));
    let pager = Paginate::new(
        cursor_api(queries.clone()),
        "http://api.test/items",
        JsonCursor::new("/data", "/next_cursor"),
    )
    .unwrap();
    for bad in [
        "".to_owned(),
        "x".repeat(100_000),
        "x".repeat(MAX_CURSOR_LEN + 1),
    ] {
        let err = pager.page(Some(&bad), 10).await.unwrap_err();
        assert_eq!(
            *err.kind(),
            sturdy::core::ErrorKind::Pagination,
            "{} bytes: {err}",
            bad.len()
        );
    }
    assert!(queries.lock().unwrap().is_empty(), "no request sent");
    // A real cursor resumes.
    let first = pager.page(None, 3).await.unwrap();
    let next = pager.page(first.next_cursor.as_deref(), 3).await.unwrap();
    assert_eq!(next.items.len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Link, versions, human_duration (RELIABILITY.md, version.md, sturdy-core)
// ---------------------------------------------------------------------------------------------

/// RELIABILITY.md: "`Link` header | 100 links kept by `parse_link` ..., 32 parameters per link".
#[test]
fn s51a_link_bounds_100_links_32_params() {
    assert_eq!((MAX_LINKS, MAX_LINK_PARAMS), (100, 32));
    let links = |n: usize| {
        let v: Vec<String> = (0..n).map(|i| format!("</p{i}>; rel=\"r{i}\"")).collect();
        let mut h = HeaderMap::new();
        h.insert("link", HeaderValue::from_str(&v.join(", ")).unwrap());
        parse_link(&h, "http://api.test/x").len()
    };
    assert_eq!(links(99), 99);
    assert_eq!(links(100), 100);
    assert_eq!(links(101), 100);
    assert_eq!(links(5000), 100);
    let params = |n: usize| {
        let p: String = (0..n).map(|i| format!("; p{i}=v")).collect();
        let mut h = HeaderMap::new();
        h.insert(
            "link",
            HeaderValue::from_str(&format!("</next>; rel=next{p}")).unwrap(),
        );
        let l = parse_link(&h, "http://api.test/x");
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].target(), "http://api.test/next");
        l[0].params().len()
    };
    assert_eq!(params(32), 32);
    assert_eq!(params(33), 32);
}

/// version.md: "reported once per endpoint ...; the layer remembers 10,000 of them": the first
/// endpoint, seen again after 9,999 others, is not reported again.
#[tokio::test]
async fn s51a_version_remembers_10000_endpoints() {
    use sturdy::version::VersionLayer;
    let notices = Arc::new(AtomicUsize::new(0));
    let n2 = notices.clone();
    let api = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("deprecation", "@1700000000")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    });
    let svc = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .on_notice(move |_| {
            n2.fetch_add(1, Ordering::SeqCst);
        })
        .layer(api);
    for i in 0..10_000 {
        let r = Request::get(format!("http://api.test/e{i}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        svc.clone().oneshot(r).await.unwrap();
    }
    assert_eq!(notices.load(Ordering::SeqCst), 10_000);
    let r = Request::get("http://api.test/e0")
        .body(Full::new(Bytes::new()))
        .unwrap();
    svc.clone().oneshot(r).await.unwrap();
    assert_eq!(
        notices.load(Ordering::SeqCst),
        10_000,
        "the 10,000 endpoints are all remembered"
    );
}

/// sturdy-core rustdoc: "Formats a duration for people and language models: `250ms`, `30s`,
/// `2m 5s`, `1h 3m`." Hostile: `Duration::MAX` does not panic.
#[test]
fn s51a_human_duration_examples() {
    assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
    assert_eq!(human_duration(secs(30)), "30s");
    assert_eq!(human_duration(secs(125)), "2m 5s");
    assert_eq!(human_duration(secs(3780)), "1h 3m");
    assert_eq!(human_duration(Duration::from_millis(999)), "999ms");
    assert_eq!(human_duration(secs(1)), "1s");
    assert_eq!(human_duration(secs(120)), "2m");
    assert_eq!(human_duration(secs(300)), "5m");
    let s = human_duration(Duration::MAX);
    assert!(!s.is_empty());
}

/// webhooks.md: "Event ids are at most `MAX_ID_LEN` (256) bytes; carried header values at most
/// 1 KiB, 4 per name" (GitHub carries `X-GitHub-Event`, `X-GitHub-Delivery`, ...).
#[tokio::test]
async fn s51a_webhook_carried_headers_1kib_4_per_name() {
    use sturdy::webhook::{sign_github, GitHub};
    let (queue, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), queue);
    let body = b"{\"action\":\"opened\"}";
    let mut req = Request::post("http://hooks.test/github")
        .header("x-hub-signature-256", sign_github("gh-secret", body))
        .header("x-github-event", "e".repeat(1024))
        .header("x-github-hook-id", "h".repeat(1025));
    for i in 0..5 {
        req = req.header("x-github-delivery", format!("d{i}"));
    }
    let res = rx
        .oneshot(req.body(Full::new(Bytes::from_static(body))).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let ev = events.recv().await.unwrap();
    assert_eq!(
        ev.headers.get("x-github-event").map(|v| v.len()),
        Some(1024),
        "a 1 KiB value is carried whole"
    );
    assert!(
        ev.headers.values().all(|v| v.len() <= 1024),
        "a value over 1 KiB carried: {:?}",
        ev.headers.get("x-github-hook-id").map(|v| v.len())
    );
    assert_eq!(ev.headers.get_all("x-github-delivery").iter().count(), 4);
}

/// webhooks.md: "a full queue gets 503 with `Retry-After` and the id is not remembered, so the
/// redelivery is accepted"; `MemoryQueue::new`: "0 is taken as 1", `usize::MAX` "as good as
/// unbounded".
#[tokio::test]
async fn s51a_webhook_full_queue_503_then_redelivery() {
    let now = UNIX_EPOCH + secs(T0 as u64);
    let (queue, mut events) = MemoryQueue::new(0);
    let rx = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), queue)
        .with_clock(Arc::new(ManualClock::at(now)));
    let r1 = rx
        .clone()
        .oneshot(standard_req("q1", T0, b"{}", None))
        .await
        .unwrap();
    assert_eq!(r1.status(), 200, "capacity 0 is taken as 1");
    let r2 = rx
        .clone()
        .oneshot(standard_req("q2", T0, b"{}", None))
        .await
        .unwrap();
    assert_eq!(r2.status(), 503);
    assert!(r2.headers().contains_key("retry-after"));
    assert_eq!(events.recv().await.unwrap().id, "q1");
    let r3 = rx
        .clone()
        .oneshot(standard_req("q2", T0, b"{}", None))
        .await
        .unwrap();
    assert_eq!(r3.status(), 200, "the redelivery is accepted");
    assert_eq!(events.recv().await.unwrap().id, "q2");
    let (_big, _rx2) = MemoryQueue::new(usize::MAX);
}
