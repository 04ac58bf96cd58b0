//! Edges of the retry layer's promises (docs/guides/retry.md, RELIABILITY.md): what a server's
//! 429/503 with a long `Retry-After` says about delivery, jitter that would cross the deadline,
//! a deadline reached while waiting for readiness, bodies that lie about their size or fail while
//! read for replay, the obsolete HTTP date formats, and a rate-limit pause met by a deadline in
//! a `ClientBuilder` stack.
#![cfg(feature = "full")]

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use sturdy::core::classify::delivery;
use sturdy::core::clock::ManualClock;
use sturdy::core::{find, BoxError, CallOptions, CallReport, Delivery, RateLimited};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tower::limit::ConcurrencyLimit;
use tower::{Layer, Service, ServiceExt};

use crate::retry28_common::*;

const URL: &str = "http://api.example.com/orders";

#[tokio::test(start_paused = true)]
async fn a_servers_long_retry_after_is_not_read_as_unsent() {
    // The server answered: whatever the error says, the request reached it.
    for code in [429, 503] {
        for r in [get(URL), req("DELETE", URL)] {
            let method = r.method().clone();
            let (svc, seen) = api(move |_, _| Ok(with_retry_after(code, "120")));
            let err = RetryLayer::new().layer(svc).oneshot(r).await.unwrap_err();
            assert_eq!(seen.len(), 1);
            assert!(find::<RateLimited>(&*err).is_some());
            assert_eq!(
                delivery(&*err),
                Delivery::MaybeProcessed,
                "{method} {code}: {err}"
            );
            if let Some(report) = err
                .downcast_ref::<sturdy::core::Error>()
                .and_then(|e| e.report())
            {
                assert_eq!(report.delivery(), Delivery::MaybeProcessed);
                assert_eq!(report.attempts(), 1);
            }
            assert!(!err.to_string().contains("not sent"), "{err}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_unkeyed_post_with_a_long_retry_after_ends_as_rate_limited() {
    // "a 429 or a 503 that carries a Retry-After ends the call as a RateLimited error when that
    // wait is not slept, also on the last attempt, so the caller always learns how long the
    // server asked it to wait"
    for code in [429, 503] {
        let (svc, _) = api(move |_, _| Ok(with_retry_after(code, "120")));
        let res = RetryLayer::new().layer(svc).oneshot(post(URL, "{}")).await;
        let err = res.map(|r| r.status()).unwrap_err();
        assert!(find::<RateLimited>(&*err).is_some());
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    }
}

#[tokio::test(start_paused = true)]
async fn a_keyed_post_rate_limited_by_the_server_keeps_its_key_in_the_error() {
    let (svc, _) = api(|_, _| Ok(with_retry_after(503, "600")));
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "k-rl-600".parse().unwrap());
    let err = RetryLayer::new().layer(svc).oneshot(r).await.unwrap_err();
    assert!(find::<RateLimited>(&*err).is_some());
    assert!(
        err.to_string().contains("k-rl-600"),
        "the caller is not told which key to retry with: {err}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_in_flight_409_returned_carries_maybe_processed() {
    let (svc, _) = api(|_, _| {
        Ok(Response::builder()
            .status(409)
            .header("retry-after", "3600")
            .body(Full::from("{}"))
            .unwrap())
    });
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "k".parse().unwrap());
    let res = RetryLayer::new().layer(svc).oneshot(r).await.unwrap();
    let report = res.extensions().get::<CallReport>().unwrap();
    assert_eq!(report.delivery(), Delivery::MaybeProcessed);
}

#[tokio::test(start_paused = true)]
async fn retry_after_jitter_never_carries_an_attempt_past_the_deadline() {
    for seed in 0..32 {
        let (svc, seen) = api(|n, _| {
            Ok(if n == 0 {
                with_retry_after(503, "8")
            } else {
                status(200)
            })
        });
        let start = tokio::time::Instant::now();
        let res = RetryLayer::new()
            .with_seed(seed)
            .with_deadline(Duration::from_secs(9))
            .layer(svc)
            .oneshot(get(URL))
            .await;
        if seen.len() == 2 {
            let at = seen.get(1).at - start;
            assert!(
                at <= Duration::from_secs(9),
                "seed {seed}: attempt at {at:?}"
            );
            assert!(at >= Duration::from_secs(8));
            assert_eq!(res.unwrap().status(), 200);
        } else {
            assert!(find::<RateLimited>(&*res.unwrap_err()).is_some());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_deadline_covers_waiting_for_readiness_before_a_retry() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_r: Req| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Ok::<_, BoxError>(status(503))
            } else {
                // Holds the only permit for an hour.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(status(200))
            }
        }
    });
    let limited = ConcurrencyLimit::new(inner, 1);
    let retry = RetryLayer::new()
        .with_seed(1)
        .with_deadline(Duration::from_secs(2))
        .layer(limited.clone());
    let start = tokio::time::Instant::now();
    let call = tokio::spawn(retry.oneshot(get(URL)));
    // While the call sleeps its backoff, another caller takes the permit and keeps it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let hog = tokio::spawn(limited.oneshot(get(URL)));
    let res = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the deadline did not cut the wait for readiness")
        .unwrap();
    let took = start.elapsed();
    assert!(took <= Duration::from_secs(2), "{took:?}");
    match res {
        Ok(r) => assert_eq!(r.status(), 503),
        Err(e) => assert_eq!(delivery(&*e), Delivery::MaybeProcessed),
    }
    hog.abort();
}

#[tokio::test(start_paused = true)]
async fn a_request_deadline_wins_over_the_layers_both_ways() {
    let hang = tower::service_fn(|_r: Req| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<Res, BoxError>(status(200))
    });
    let layer = RetryLayer::new().with_deadline(Duration::from_secs(1));
    for (own, expect) in [(10, 10), (0, 0), (1, 1)] {
        let mut r = get(URL);
        if own > 0 {
            r.extensions_mut()
                .insert(CallOptions::new().with_deadline(Duration::from_secs(own)));
        }
        let start = tokio::time::Instant::now();
        let _ = layer.clone().layer(hang).oneshot(r).await.unwrap_err();
        let want = if expect == 0 { 1 } else { expect };
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(want),
            "own deadline {own}"
        );
    }
}

/// A body whose size hint says `hint` bytes and which yields `real` bytes, or an error.
struct Lying {
    hint: u64,
    chunks: Vec<Result<Bytes, std::io::Error>>,
}

impl From<Bytes> for Lying {
    fn from(b: Bytes) -> Self {
        Self {
            hint: b.len() as u64,
            chunks: vec![Ok(b)],
        }
    }
}

impl Body for Lying {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let me = self.get_mut();
        if me.chunks.is_empty() {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(me.chunks.remove(0).map(Frame::data)))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.hint)
    }
}

fn body_api() -> (
    impl Service<Request<Lying>, Response = Response<Full<Bytes>>, Error = BoxError> + Clone,
    Arc<std::sync::Mutex<Vec<usize>>>,
) {
    let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = sizes.clone();
    let svc = tower::service_fn(move |req: Request<Lying>| {
        let s = s.clone();
        async move {
            let body = http_body_util::BodyExt::collect(req.into_body()).await;
            let n = body.map(|b| b.to_bytes().len()).unwrap_or(usize::MAX);
            let first = {
                let mut v = s.lock().unwrap();
                v.push(n);
                v.len() == 1
            };
            Ok::<_, BoxError>(if first { status(503) } else { status(200) })
        }
    });
    (svc, sizes)
}

#[tokio::test(start_paused = true)]
async fn a_body_that_lies_about_its_size_is_not_kept_past_the_limit() {
    let (svc, sizes) = body_api();
    let big = Bytes::from(vec![b'x'; 2 * 1024 * 1024]);
    let r = Request::put(URL)
        .body(Lying {
            hint: 10,
            chunks: vec![Ok(big)],
        })
        .unwrap();
    let _ = RetryLayer::new().layer(svc).oneshot(r).await;
    let sizes = sizes.lock().unwrap().clone();
    // Either sent once, or refused; never 2 MiB kept and replayed under a 1 MiB bound.
    assert!(
        sizes.len() <= 1,
        "a 2 MiB body with a 10-byte hint was kept and replayed: {sizes:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_failing_while_read_for_replay_is_reported_as_unsent() {
    let (svc, sizes) = body_api();
    let r = Request::post(URL)
        .header("idempotency-key", "k-body-err")
        .body(Lying {
            hint: 10,
            chunks: vec![
                Ok(Bytes::from_static(b"hello")),
                Err(std::io::Error::other("disk read failed")),
            ],
        })
        .unwrap();
    let res = RetryLayer::new().layer(svc).oneshot(r).await;
    let sizes = sizes.lock().unwrap().clone();
    match res {
        Err(err) => {
            if sizes.is_empty() {
                assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
            }
            let text = err.to_string();
            assert!(
                text.contains("disk read failed") || text.contains("body"),
                "{text}"
            );
        }
        Ok(r) => panic!("a failed body gave {} after {sizes:?}", r.status()),
    }
}

#[tokio::test(start_paused = true)]
async fn obsolete_http_date_forms_are_honoured() {
    // RFC 9110 5.6.7: recipients MUST accept the obsolete RFC 850 and asctime forms too.
    let clock = ManualClock::at(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777));
    for ra in [
        "Sun, 06 Nov 1994 08:49:47 GMT",
        "Sunday, 06-Nov-94 08:49:47 GMT",
        "Sun Nov  6 08:49:47 1994",
    ] {
        let (svc, seen) = api(move |n, _| {
            Ok(if n == 0 {
                with_retry_after(503, ra)
            } else {
                status(200)
            })
        });
        RetryLayer::new()
            .with_clock(Arc::new(clock.clone()))
            .with_retry_after_jitter(0.0)
            .layer(svc)
            .oneshot(get(URL))
            .await
            .unwrap();
        assert_eq!(seen.gap(0), Duration::from_secs(10), "{ra}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_pause_past_the_deadline_is_refused_at_once_unsent() {
    let (svc, seen) = api(|n, _| {
        Ok(if n == 0 {
            with_retry_after(429, "30")
        } else {
            status(201)
        })
    });
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(1))
        .build(svc);
    // The first call learns of a 30 s pause and does not retry.
    let mut r = get(URL);
    r.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let err = client.clone().oneshot(r).await.unwrap_err();
    assert!(find::<RateLimited>(&*err).is_some());
    // A keyed POST with a 5 s deadline: its turn would come after it.
    let mut r = post(URL, "{}");
    r.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(5)));
    let start = tokio::time::Instant::now();
    let err = client.oneshot(r).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(10),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(seen.len(), 1);
    let rl = find::<RateLimited>(&*err).expect("RateLimited");
    assert!(
        rl.retry_after() > Duration::from_secs(25),
        "{:?}",
        rl.retry_after()
    );
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    let text = err.to_string();
    assert!(text.contains("not sent"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn the_readme_quick_start_shape_compiles_and_keys_posts() {
    let (svc, seen) = api(|_, _| Ok(status(201)));
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_deadline(Duration::from_secs(30)))
        .with_version(sturdy::version::VersionLayer::header("api-version", "2024-06-01").unwrap())
        .build(svc);
    let req = Request::post("http://127.0.0.1:8080/orders")
        .body(Full::from(r#"{"item":"book"}"#))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 201);
    let r = seen.get(0);
    assert!(r.headers.contains_key("idempotency-key"));
    assert_eq!(r.headers["api-version"], "2024-06-01");
}
