//! s40: coalescing keeps the `CallReport` (docs/guides/coalesce.md, "Errors are shared too";
//! crates/sturdy-coalesce/CHANGELOG.md, Unreleased; README.md: "the retry layer's final error is
//! one `sturdy::core::Error` with a `CallReport`"), through `ClientBuilder::with_coalesce`, on
//! paused time against an in-process service, compared with the same client without coalescing.

#![cfg(feature = "full")]

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::classify;
use sturdy::core::{BoxError, Delivery, Error};
use sturdy::ClientBuilder;
use tower::{service_fn, ServiceExt};

#[derive(Clone, Copy, Debug)]
enum Fail {
    Refused,
    Reset,
    Status503,
}

fn server(
    fail: Fail,
    count: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_r: Request<Full<Bytes>>| {
        let count = count.clone();
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            match fail {
                Fail::Refused => Err::<Response<Full<Bytes>>, BoxError>(Box::new(io::Error::from(
                    io::ErrorKind::ConnectionRefused,
                ))),
                Fail::Reset => {
                    Err(Box::new(io::Error::from(io::ErrorKind::ConnectionReset)) as BoxError)
                }
                Fail::Status503 => Ok(Response::builder()
                    .status(503)
                    .body(Full::new(Bytes::from_static(b"down")))
                    .unwrap()),
            }
        }
    })
}

fn get(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::get("http://api.example.com/x");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// What a failed call said: (attempts, delivery, key) from the report, or None for a response.
type Said = Option<(u32, Delivery, Option<String>)>;

fn said<B>(r: &Result<Response<B>, BoxError>, who: &str) -> Said {
    let Err(e) = r else { return None };
    let top = e
        .downcast_ref::<Error>()
        .unwrap_or_else(|| panic!("{who}: top-level error is not sturdy Error: {e}"));
    let rep = top
        .report()
        .unwrap_or_else(|| panic!("{who}: no CallReport on the top-level error: {e}"));
    assert_eq!(
        classify::delivery(&**e),
        rep.delivery(),
        "{who}: classify::delivery disagrees with the report"
    );
    let found = sturdy::core::find::<Error>(&**e).expect("find");
    assert_eq!(
        found.report().map(|r| r.attempts()),
        Some(rep.attempts()),
        "{who}: find::<Error> finds an Error whose report differs"
    );
    assert_eq!(
        top.delivery(),
        Some(rep.delivery()),
        "{who}: Error::delivery"
    );
    assert_eq!(top.idempotency_key(), rep.idempotency_key(), "{who}: key");
    Some((
        rep.attempts(),
        rep.delivery(),
        rep.idempotency_key().map(str::to_owned),
    ))
}

async fn baseline(fail: Fail, key: Option<&str>) -> (Said, usize) {
    let n = Arc::new(AtomicUsize::new(0));
    let client = ClientBuilder::new().build(server(fail, n.clone()));
    let r = client.oneshot(get(key)).await;
    (said(&r, "baseline"), n.load(Ordering::SeqCst))
}

async fn coalesced(fail: Fail, key: Option<&str>, callers: usize) -> (Vec<Said>, usize) {
    let n = Arc::new(AtomicUsize::new(0));
    let client = ClientBuilder::new()
        .with_coalesce(CoalesceLayer::new())
        .build(server(fail, n.clone()));
    let calls: Vec<_> = (0..callers)
        .map(|_| client.clone().oneshot(get(key)))
        .collect();
    let rs = futures_util::future::join_all(calls).await;
    let out = rs
        .iter()
        .enumerate()
        .map(|(i, r)| said(r, &format!("caller {i}")))
        .collect();
    (out, n.load(Ordering::SeqCst))
}

async fn check(fail: Fail, key: Option<&str>) {
    let (base, base_n) = baseline(fail, key).await;
    let (all, n) = coalesced(fail, key, 5).await;
    assert_eq!(n, base_n, "{fail:?}: one shared call made as many attempts");
    for (i, s) in all.iter().enumerate() {
        assert_eq!(s, &base, "{fail:?}: caller {i} vs without coalescing");
    }
    if let Some((attempts, _, _)) = &base {
        assert_eq!(
            *attempts as usize, base_n,
            "attempts = requests the server saw"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn s40_coalesced_refused_calls_carry_the_report() {
    check(Fail::Refused, None).await;
    let (base, _) = baseline(Fail::Refused, None).await;
    assert_eq!(base.unwrap().1, Delivery::NotSent);
}

#[tokio::test(start_paused = true)]
async fn s40_coalesced_reset_calls_carry_the_report() {
    check(Fail::Reset, None).await;
    let (base, _) = baseline(Fail::Reset, None).await;
    assert_eq!(base.unwrap().1, Delivery::MaybeProcessed);
}

#[tokio::test(start_paused = true)]
async fn s40_coalesced_503_storm_matches_uncoalesced() {
    check(Fail::Status503, None).await;
}

#[tokio::test(start_paused = true)]
async fn s40_coalesced_keyed_get_carries_the_key() {
    check(Fail::Refused, Some("k-s40-123")).await;
    let (base, _) = baseline(Fail::Refused, Some("k-s40-123")).await;
    assert_eq!(base.unwrap().2.as_deref(), Some("k-s40-123"));
}
