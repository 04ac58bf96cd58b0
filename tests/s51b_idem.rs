#![cfg(feature = "full")]
//! s51b: client idempotency keys and request coalescing composed with the retry layer, on paused
//! time over in-process services, checked against docs/guides/idempotency.md and
//! docs/guides/coalesce.md: one key for every attempt of a call and a new one per call, a
//! user's key kept, blank and hostile keys (`CallOptions::with_idempotency_key`) sent as the
//! guide says; identical GETs coalesced under `Buffer` and over `ConcurrencyLimit(1)` driven as
//! kept services, a retried shared call, and cancelled leaders and followers.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::CallOptions;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

type Seen = Arc<Mutex<Vec<(String, Option<Vec<u8>>)>>>;

/// An API that answers `script` in turn (the last one afterwards) and records each request's
/// method and `Idempotency-Key` bytes.
fn recording(
    script: Vec<u16>,
) -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Seen,
) {
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let script = Arc::new(script);
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        let n = {
            let mut g = s2.lock().unwrap();
            g.push((
                req.method().to_string(),
                req.headers()
                    .get("idempotency-key")
                    .map(|v| v.as_bytes().to_vec()),
            ));
            g.len() - 1
        };
        let code = *script.get(n).or(script.last()).unwrap();
        async move {
            let mut r = Response::new(Full::default());
            *r.status_mut() = StatusCode::from_u16(code).unwrap();
            Ok::<_, Infallible>(r)
        }
    });
    (svc, seen)
}

fn keys(seen: &Seen) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(_, k)| {
            k.as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        })
        .collect()
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::exponential(Duration::from_millis(10), Duration::from_millis(10)).unwrap(),
        )
        .with_seed(51)
}

fn req(method: &str, uri: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(if method == "GET" {
            Full::default()
        } else {
            Full::from("{}")
        })
        .unwrap()
}

fn with_key(mut r: Request<Full<Bytes>>, key: &str) -> Request<Full<Bytes>> {
    r.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key(key));
    r
}

fn is_digest(k: &str) -> bool {
    k.strip_prefix("sturdy-sha256-").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// idempotency.md: "sets one random UUID v4 per logical POST/PATCH; every retry carries the same
/// key"; a GET gets none.
#[tokio::test(start_paused = true)]
async fn s51b_idem_patch_one_key_per_call_across_attempts() {
    let (api, seen) = recording(vec![503, 502, 200, 503, 200, 200]);
    let client = ClientBuilder::new().with_retry(quick_retry()).build(api);
    for _ in 0..2 {
        let res = client
            .clone()
            .oneshot(req("PATCH", "http://api.example.com/orders/1"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    client
        .clone()
        .oneshot(req("GET", "http://api.example.com/orders/1"))
        .await
        .unwrap();
    let k = keys(&seen);
    assert_eq!(k.len(), 6, "{k:?}");
    assert!(!k[0].is_empty());
    assert_eq!((k[0] == k[1], k[1] == k[2]), (true, true), "{k:?}");
    assert_eq!(k[3], k[4], "{k:?}");
    assert_ne!(k[0], k[3], "{k:?}");
    assert_eq!(k[5], "", "a GET got a key: {k:?}");
}

/// idempotency.md: "a blank one, empty or only spaces and tabs, names no operation and is
/// replaced by a fresh key"; in `ClientBuilder` the retry layer then retries it with that key.
#[tokio::test(start_paused = true)]
async fn s51b_idem_blank_header_is_replaced_and_the_post_retried_with_it() {
    for blank in ["", "   ", " \t "] {
        let (api, seen) = recording(vec![503, 200]);
        let client = ClientBuilder::new().with_retry(quick_retry()).build(api);
        let mut r = req("POST", "http://api.example.com/orders");
        r.headers_mut().insert(
            "idempotency-key",
            http::HeaderValue::from_str(blank).unwrap(),
        );
        let res = client.oneshot(r).await.unwrap();
        assert_eq!(res.status(), 200, "{blank:?}");
        let k = keys(&seen);
        assert_eq!(k.len(), 2, "{blank:?}: {k:?}");
        assert!(!k[0].trim().is_empty(), "{blank:?}: {k:?}");
        assert_eq!(k[0], k[1], "{blank:?}: {k:?}");
    }
}

/// idempotency.md: a key in `CallOptions` "is sent as `sturdy-sha256-` and the hex SHA-256 of
/// the key when it is empty, holds control characters, a tab inside among them ..., or begins
/// or ends with a space or a tab ...: the digest is the same every time, so the same key still
/// names the same request, and not the same as another key"; "the value sent is the key a
/// failed call reports".
#[tokio::test(start_paused = true)]
async fn s51b_idem_hostile_call_option_keys_are_sent_as_stable_digests() {
    let hostile = [
        "a\r\nb", "a\nb", " k", "k ", "\tk", "a\tb", "x\u{0}y", "k\u{7f}",
    ];
    let mut sent = Vec::new();
    for key in hostile {
        let (api, seen) = recording(vec![503, 200]);
        let client = ClientBuilder::new().with_retry(quick_retry()).build(api);
        for _ in 0..2 {
            client
                .clone()
                .oneshot(with_key(req("POST", "http://api.example.com/orders"), key))
                .await
                .unwrap();
        }
        let k = keys(&seen);
        assert_eq!(k.len(), 3, "{key:?}: {k:?}");
        assert!(is_digest(&k[0]), "{key:?} sent as {:?}", k[0]);
        assert!(k.iter().all(|x| x == &k[0]), "{key:?}: {k:?}");
        sent.push(k[0].clone());
    }
    let mut dedup = sent.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(
        dedup.len(),
        sent.len(),
        "two hostile keys share a digest: {sent:?}"
    );
    // The empty key: SHA-256 of nothing.
    let (api, seen) = recording(vec![200]);
    ClientBuilder::new()
        .with_retry(quick_retry())
        .build(api)
        .oneshot(with_key(req("POST", "http://api.example.com/orders"), ""))
        .await
        .unwrap();
    assert_eq!(
        keys(&seen),
        ["sturdy-sha256-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]
    );
    // A failed call reports the value it sent.
    let (api, seen) = recording(vec![503]);
    let err_or_res = ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(2))
        .build(api)
        .oneshot(with_key(
            req("POST", "http://api.example.com/orders"),
            "a\r\nb",
        ))
        .await;
    let k = keys(&seen);
    assert_eq!(k.len(), 2);
    assert_eq!(k[0], sent[0]);
    if let Err(e) = err_or_res {
        let e = sturdy::core::find::<sturdy::core::Error>(&*e).unwrap();
        assert_eq!(e.idempotency_key(), Some(sent[0].as_str()));
        assert!(!e.to_string().contains('\r'));
    }
}

/// idempotency.md: "A key given in `CallOptions` is sent with any method, not only POST and
/// PATCH"; a plain visible-ASCII key is sent as it is; "one with characters beyond ASCII is
/// sent as its UTF-8 bytes".
#[tokio::test(start_paused = true)]
async fn s51b_idem_call_option_keys_on_any_method_and_beyond_ascii() {
    let (api, seen) = recording(vec![503, 200]);
    let client = ClientBuilder::new().with_retry(quick_retry()).build(api);
    for (m, key) in [
        ("GET", "order-1"),
        ("DELETE", "order-2"),
        ("POST", "ключ-3"),
    ] {
        client
            .clone()
            .oneshot(with_key(req(m, "http://api.example.com/orders"), key))
            .await
            .unwrap();
    }
    let got: Vec<(String, Option<Vec<u8>>)> = seen.lock().unwrap().clone();
    assert_eq!(got[0], ("GET".to_owned(), Some(b"order-1".to_vec())));
    assert_eq!(got[1], ("GET".to_owned(), Some(b"order-1".to_vec())));
    assert_eq!(got[2], ("DELETE".to_owned(), Some(b"order-2".to_vec())));
    assert_eq!(
        got[3],
        ("POST".to_owned(), Some("ключ-3".as_bytes().to_vec()))
    );
}

/// idempotency.md: a header key set by the caller is kept, and a `CallOptions` key given for
/// one request is "for one request" only: the next call gets a fresh key.
#[tokio::test(start_paused = true)]
async fn s51b_idem_user_keys_do_not_leak_into_the_next_call() {
    let (api, seen) = recording(vec![200]);
    let client = ClientBuilder::new().with_retry(quick_retry()).build(api);
    let mut r = req("POST", "http://api.example.com/orders");
    r.headers_mut()
        .insert("idempotency-key", http::HeaderValue::from_static("mine-1"));
    client.clone().oneshot(r).await.unwrap();
    client
        .clone()
        .oneshot(with_key(
            req("POST", "http://api.example.com/orders"),
            "mine-2",
        ))
        .await
        .unwrap();
    client
        .clone()
        .oneshot(req("POST", "http://api.example.com/orders"))
        .await
        .unwrap();
    let k = keys(&seen);
    assert_eq!(&k[..2], ["mine-1", "mine-2"]);
    assert!(
        !k[2].is_empty() && k[2] != "mine-1" && k[2] != "mine-2",
        "{k:?}"
    );
}

/// idempotency.md: "When the server answers 409 with `Retry-After` to a request that carries a
/// key ..., the retry layer waits and asks again ... A 409 without `Retry-After`, or to a
/// request without a key, is a real conflict and is returned as it is."
#[tokio::test(start_paused = true)]
async fn s51b_idem_409_in_flight_is_retried_only_with_a_key_and_retry_after() {
    let conflict = |ra: bool| {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let svc = service_fn(move |_req: Request<Full<Bytes>>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut r = Response::new(Full::<Bytes>::default());
                if n == 0 {
                    *r.status_mut() = StatusCode::CONFLICT;
                    if ra {
                        r.headers_mut()
                            .insert("retry-after", http::HeaderValue::from_static("1"));
                    }
                } else {
                    *r.status_mut() = StatusCode::CREATED;
                }
                Ok::<_, Infallible>(r)
            }
        });
        (svc, calls)
    };
    // With a key (ClientBuilder) and Retry-After: waited out, then the stored answer.
    let (svc, calls) = conflict(true);
    let t = tokio::time::Instant::now();
    let res = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(svc)
        .oneshot(req("POST", "http://api.example.com/orders"))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(t.elapsed() >= Duration::from_secs(1));
    // Without Retry-After: returned as it is.
    let (svc, calls) = conflict(false);
    let res = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(svc)
        .oneshot(req("POST", "http://api.example.com/orders"))
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Without a key: returned as it is.
    let (svc, calls) = conflict(true);
    let res = ClientBuilder::new()
        .without_idempotency()
        .with_retry(quick_retry())
        .build(svc)
        .oneshot(req("POST", "http://api.example.com/orders"))
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Coalescing.

/// A slow API (100 ms) counting upstream calls and calls whose future was dropped unfinished.
struct Slow {
    upstream: Arc<AtomicU32>,
    dropped: Arc<AtomicU32>,
    fail_first: Arc<AtomicBool>,
}

struct DropGuard(Arc<AtomicU32>, bool);
impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn slow(
    fail_first: bool,
) -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Slow,
) {
    let st = Slow {
        upstream: Arc::default(),
        dropped: Arc::default(),
        fail_first: Arc::new(AtomicBool::new(fail_first)),
    };
    let (u, d, f) = (
        st.upstream.clone(),
        st.dropped.clone(),
        st.fail_first.clone(),
    );
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = u.fetch_add(1, Ordering::SeqCst);
        let guard = DropGuard(d.clone(), false);
        let fail = f.swap(false, Ordering::SeqCst);
        async move {
            let mut guard = guard;
            tokio::time::sleep(Duration::from_millis(100)).await;
            guard.1 = true;
            drop(guard);
            let mut r = Response::new(Full::new(Bytes::from(format!("answer {n}"))));
            if fail {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok::<_, Infallible>(r)
        }
    });
    (svc, st)
}

async fn body_of<B>(res: Response<B>) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    res.into_body().collect().await.unwrap().to_bytes()
}

/// README: the client "can sit under a `Buffer` ..., driven by `oneshot` or a kept
/// `ready().await?.call(req)`"; coalesce.md: identical GETs in flight share one upstream call.
#[tokio::test(start_paused = true)]
async fn s51b_idem_coalesced_client_under_buffer_as_a_kept_service() {
    let (api, st) = slow(false);
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_coalesce(CoalesceLayer::new())
        .build(api);
    let buffered = tower::buffer::Buffer::new(client, 32);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let mut svc = buffered.clone();
        tasks.push(tokio::spawn(async move {
            let res = svc
                .ready()
                .await?
                .call(req("GET", "http://api.example.com/orders?page=1"))
                .await?;
            Ok::<_, sturdy::core::BoxError>(body_of(res).await)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "answer 0");
    }
    assert_eq!(st.upstream.load(Ordering::SeqCst), 1);
}

/// coalesce.md, Readiness: "A request that joins a call drops that ready service at once, which
/// gives back what it reserved (a `ConcurrencyLimit` permit, a `Buffer` slot)". Coalescing over
/// `ConcurrencyLimit(2)`, each caller a kept clone: the leader holds one permit, and each
/// joiner takes the other and gives it back at once, so the next caller can join too: one
/// upstream call for all.
#[tokio::test(start_paused = true)]
async fn s51b_idem_coalesce_joiners_give_their_permit_back_at_once() {
    let (api, st) = slow(false);
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new())
        .concurrency_limit(2)
        .service(api);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            let res = s
                .ready()
                .await?
                .call(req("GET", "http://api.example.com/orders"))
                .await?;
            Ok::<_, sturdy::core::BoxError>(body_of(res).await)
        }));
    }
    for t in tasks {
        let b = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("a caller hung behind the limit")
            .unwrap()
            .unwrap();
        assert_eq!(b, "answer 0");
    }
    assert_eq!(st.upstream.load(Ordering::SeqCst), 1);
}

/// The same over `ConcurrencyLimit(1)` (where "a second caller waits in `poll_ready` before it
/// can join"): every caller is answered, none hangs, and the permit is free afterwards.
#[tokio::test(start_paused = true)]
async fn s51b_idem_coalesce_over_a_limit_of_one_kept_services() {
    let (api, st) = slow(false);
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new())
        .concurrency_limit(1)
        .service(api);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            let res = s
                .ready()
                .await?
                .call(req("GET", "http://api.example.com/orders"))
                .await?;
            Ok::<_, sturdy::core::BoxError>(body_of(res).await)
        }));
    }
    for t in tasks {
        let b = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("a caller hung behind the limit")
            .unwrap()
            .unwrap();
        assert!(b.starts_with(b"answer "), "{b:?}");
    }
    let upstream = st.upstream.load(Ordering::SeqCst);
    assert!((1..=8).contains(&upstream), "{upstream}");
    // The permit is back: a different request goes through.
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        svc.clone()
            .oneshot(req("GET", "http://api.example.com/other")),
    )
    .await
    .expect("the limit stayed taken")
    .unwrap();
    assert_eq!(body_of(res).await, format!("answer {upstream}"));
}

/// coalesce.md: "Outermost, so identical calls share one whole outcome, retries included":
/// the shared call's 503 is retried once for everyone.
#[tokio::test(start_paused = true)]
async fn s51b_idem_a_shared_call_is_retried_once_for_every_caller() {
    let (api, st) = slow(true);
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_coalesce(CoalesceLayer::new())
        .build(api);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let res = c
                .oneshot(req("GET", "http://api.example.com/orders"))
                .await?;
            Ok::<_, sturdy::core::BoxError>((res.status(), body_of(res).await))
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap().unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, "answer 1");
    }
    assert_eq!(st.upstream.load(Ordering::SeqCst), 2);
}

/// coalesce.md, Leaving: "a caller that goes away ... leaves the call to the others; it goes
/// on. When the last caller leaves, the upstream call is dropped, ... The next identical
/// request starts afresh."
#[tokio::test(start_paused = true)]
async fn s51b_idem_a_cancelled_leader_leaves_the_call_to_its_followers() {
    let (api, st) = slow(false);
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_coalesce(CoalesceLayer::new())
        .build(api);
    let c = client.clone();
    let leader =
        tokio::spawn(async move { c.oneshot(req("GET", "http://api.example.com/x")).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut followers = Vec::new();
    for _ in 0..3 {
        let c = client.clone();
        followers.push(tokio::spawn(async move {
            let res = c.oneshot(req("GET", "http://api.example.com/x")).await?;
            Ok::<_, sturdy::core::BoxError>(body_of(res).await)
        }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    leader.abort();
    for f in followers {
        assert_eq!(f.await.unwrap().unwrap(), "answer 0");
    }
    assert_eq!(st.upstream.load(Ordering::SeqCst), 1);
    assert_eq!(st.dropped.load(Ordering::SeqCst), 0);

    // Every caller gone: the upstream call is dropped, and the next one starts afresh.
    let mut all = Vec::new();
    for _ in 0..3 {
        let c = client.clone();
        all.push(tokio::spawn(async move {
            c.oneshot(req("GET", "http://api.example.com/y")).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(st.upstream.load(Ordering::SeqCst), 2);
    for t in &all {
        t.abort();
    }
    for t in all {
        let _ = t.await;
    }
    tokio::task::yield_now().await;
    assert_eq!(
        st.dropped.load(Ordering::SeqCst),
        1,
        "the abandoned call still runs"
    );
    let res = client
        .clone()
        .oneshot(req("GET", "http://api.example.com/y"))
        .await
        .unwrap();
    assert_eq!(body_of(res).await, "answer 2");
    assert_eq!(st.upstream.load(Ordering::SeqCst), 3);
}

/// A follower that times out (a `tokio::time::timeout` above it) leaves; the leader and the
/// other followers still get the answer, from one upstream call.
#[tokio::test(start_paused = true)]
async fn s51b_idem_a_follower_that_times_out_leaves_the_others_unharmed() {
    let (api, st) = slow(false);
    let svc = CoalesceLayer::new().layer(api);
    let leader = tokio::spawn(svc.clone().oneshot(req("GET", "http://api.example.com/z")));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let impatient = tokio::time::timeout(
        Duration::from_millis(20),
        svc.clone().oneshot(req("GET", "http://api.example.com/z")),
    )
    .await;
    assert!(impatient.is_err());
    let other = svc
        .clone()
        .oneshot(req("GET", "http://api.example.com/z"))
        .await
        .unwrap();
    assert_eq!(body_of(other).await, "answer 0");
    let res = leader.await.unwrap().unwrap();
    assert_eq!(body_of(res).await, "answer 0");
    assert_eq!(st.upstream.load(Ordering::SeqCst), 1);
    assert_eq!(st.dropped.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------
// Nothing held: the composed client over `ConcurrencyLimit(1)`, driven as a kept service.

/// An API that answers 503 to the first request and 200 after, at once, counting requests.
fn flaky_once() -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Arc<AtomicU32>,
) {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut r = Response::new(Full::default());
            if n == 0 {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok::<_, Infallible>(r)
        }
    });
    (svc, calls)
}

/// ARCHITECTURE.md, the readiness contract: "for a second call from inside a future (a replay
/// after a 401, a retry), polls readiness again on the service the future holds, after the
/// first call's response future (and whatever permit it held) is gone". A call waiting out its
/// backoff under `ConcurrencyLimit(1)` does not hold the permit: another call goes meanwhile.
#[tokio::test(start_paused = true)]
async fn s51b_idem_a_call_in_backoff_holds_no_permit_of_a_limit_below() {
    let (api, calls) = flaky_once();
    let retry = RetryLayer::new().with_backoff(
        Backoff::exponential(Duration::from_secs(10), Duration::from_secs(10)).unwrap(),
    );
    let client = ClientBuilder::new()
        .with_retry(retry)
        .build(ServiceBuilder::new().concurrency_limit(1).service(api));
    let mut a = client.clone();
    let first = tokio::spawn(async move {
        a.ready()
            .await?
            .call(req("GET", "http://api.example.com/a"))
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let t = tokio::time::Instant::now();
    let mut b = client.clone();
    let status = tokio::time::timeout(Duration::from_secs(5), async move {
        b.ready()
            .await?
            .call(req("GET", "http://api.example.com/b"))
            .await
            .map(|r| r.status())
    })
    .await
    .expect("the second call waited for the first one's backoff")
    .unwrap();
    assert_eq!(status, 200);
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(first.await.unwrap().unwrap(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// ARCHITECTURE.md: every layer "gives back what a dropped future holds: a probe slot, a rate
/// slot, a token wait". A call waiting for a rate slot over `ConcurrencyLimit(1)`, dropped,
/// leaves neither its slot nor the permit behind: the next call goes at the quota's pace.
#[tokio::test(start_paused = true)]
async fn s51b_idem_a_call_dropped_while_waiting_for_a_rate_slot_frees_slot_and_permit() {
    use sturdy::ratelimit::{Quota, RateLimitLayer};
    let (api, calls) = flaky_once();
    let _ = calls.fetch_add(1, Ordering::SeqCst); // every answer a 200
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(RateLimitLayer::new(
            Quota::new(1, Duration::from_secs(1)).unwrap(),
        ))
        .build(ServiceBuilder::new().concurrency_limit(1).service(api));
    let t0 = tokio::time::Instant::now();
    let mut a = client.clone();
    a.ready()
        .await
        .unwrap()
        .call(req("GET", "http://api.example.com/1"))
        .await
        .unwrap();
    let mut b = client.clone();
    let dropped = tokio::time::timeout(Duration::from_millis(100), async move {
        b.ready()
            .await?
            .call(req("GET", "http://api.example.com/2"))
            .await
    })
    .await;
    assert!(
        dropped.is_err(),
        "the second call did not wait for its slot"
    );
    let mut c = client.clone();
    let res = tokio::time::timeout(Duration::from_secs(5), async move {
        c.ready()
            .await?
            .call(req("GET", "http://api.example.com/3"))
            .await
    })
    .await
    .expect("a dropped call left its permit or slot behind")
    .unwrap();
    assert_eq!(res.status(), 200);
    let took = t0.elapsed();
    assert!(took <= Duration::from_millis(1100), "{took:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// idempotency.md: "the retry layer does not count a blank key as a key either, so a POST
/// carrying one is not retried" (the retry layer used alone).
#[tokio::test(start_paused = true)]
async fn s51b_idem_retry_alone_does_not_count_a_blank_key() {
    for (key, want) in [("", 1), (" \t ", 1), ("k-1", 2)] {
        let (api, seen) = recording(vec![503, 200]);
        let mut r = req("POST", "http://api.example.com/orders");
        r.headers_mut()
            .insert("idempotency-key", http::HeaderValue::from_str(key).unwrap());
        let _ = quick_retry().layer(api).oneshot(r).await;
        assert_eq!(seen.lock().unwrap().len(), want, "{key:?}");
    }
}

/// idempotency.md: "`.with_header(name)` and `.with_methods([..])` change the header and the
/// methods; in `sturdy::ClientBuilder` the retry layer is told the header, so a POST keyed in
/// it is retried".
#[tokio::test(start_paused = true)]
async fn s51b_idem_a_custom_header_and_methods_in_the_builder() {
    use sturdy::idempotency::client::IdempotencyKeyLayer;
    let seen: Arc<Mutex<Vec<(String, Option<String>, Option<String>)>>> = Arc::default();
    let s2 = seen.clone();
    let calls = Arc::new(AtomicU32::new(0));
    let api = service_fn(move |req: Request<Full<Bytes>>| {
        s2.lock().unwrap().push((
            req.method().to_string(),
            req.headers()
                .get("x-op-key")
                .map(|v| v.to_str().unwrap().to_owned()),
            req.headers()
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_owned()),
        ));
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut r = Response::new(Full::<Bytes>::default());
            if n.is_multiple_of(2) {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok::<_, Infallible>(r)
        }
    });
    let client = ClientBuilder::new()
        .with_idempotency(
            IdempotencyKeyLayer::new()
                .with_header(http::HeaderName::from_static("x-op-key"))
                .with_methods([http::Method::POST, http::Method::PUT]),
        )
        .with_retry(quick_retry())
        .build(api);
    for (m, user) in [("POST", None), ("PUT", Some("mine")), ("POST", Some("opt"))] {
        let mut r = req(m, "http://api.example.com/orders");
        match user {
            Some("mine") => {
                r.headers_mut()
                    .insert("x-op-key", http::HeaderValue::from_static("mine"));
            }
            Some(k) => {
                r.extensions_mut()
                    .insert(CallOptions::new().with_idempotency_key(k));
            }
            None => {}
        }
        let res = client.clone().oneshot(r).await.unwrap();
        assert_eq!(res.status(), 200, "{m} {user:?}");
    }
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 6, "{got:?}");
    assert!(got.iter().all(|(_, _, std)| std.is_none()), "{got:?}");
    assert_eq!(got[0].1, got[1].1);
    assert!(
        got[0].1.as_deref().is_some_and(|k| !k.is_empty()),
        "{got:?}"
    );
    assert_eq!(got[2].1.as_deref(), Some("mine"));
    assert_eq!(got[3].1.as_deref(), Some("mine"));
    assert_eq!(got[4].1.as_deref(), Some("opt"));
    assert_eq!(got[5].1.as_deref(), Some("opt"));
}

/// The same custom-methods layer: a PATCH (no longer in the methods) gets no key and is not
/// retried after a 503.
#[tokio::test(start_paused = true)]
async fn s51b_idem_a_method_left_out_gets_no_key_and_no_retry() {
    use sturdy::idempotency::client::IdempotencyKeyLayer;
    let (api, seen) = recording(vec![503, 200]);
    let client = ClientBuilder::new()
        .with_idempotency(IdempotencyKeyLayer::new().with_methods([http::Method::PUT]))
        .with_retry(quick_retry())
        .build(api);
    let res = client
        .oneshot(req("PATCH", "http://api.example.com/orders/1"))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(keys(&seen), [""]);
}
