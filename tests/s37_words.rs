//! s37: what the three layers say: their logs and `Debug` output keep request secrets out
//! (docs/guides/coalesce.md "never logged"; the hedge's "host and path only"), and hedging's
//! budget as the docs count it.

#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::hedge::HedgeLayer;
use tower::{service_fn, Layer, ServiceExt};

use crate::logs13_common::Capture;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const SECRETS: [&str; 3] = ["s3cr3t-bearer", "qs-t0ken", "pa55word"];

fn secret_get() -> Request<Full<Bytes>> {
    Request::get("http://user:pa55word@api.example.com/orders?token=qs-t0ken")
        .header("authorization", "Bearer s3cr3t-bearer")
        .body(Full::default())
        .unwrap()
}

fn assert_clean(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what} shows {s}: {text}");
    }
}

/// docs/guides/coalesce.md: "Keys are compared in full (not by hash) and never logged"; hedge
/// rustdoc/guide: the hedge logs "The host and path only: userinfo and the query may hold
/// credentials". With every sturdy event captured at TRACE and the `Debug` of the layers, the
/// services, the response futures and the handles printed while calls are in flight (joined,
/// hedged, waiting for a place), no credential of the request shows.
#[tokio::test(start_paused = true)]
async fn s37_no_credential_in_logs_or_debug_of_the_three_layers() {
    let cap = Capture::default();
    let _g = cap.install();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(if i < 5 { 10 } else { 500 })).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
        }
    });
    let (coal, kh) = CoalesceLayer::new().pair();
    let (hedge, hh) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(ms(20), ms(20))
        .pair();
    let (conc, ch) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let svc = coal
        .clone()
        .layer(hedge.clone().layer(conc.clone().layer(api)));
    for _ in 0..5 {
        svc.clone().oneshot(secret_get()).await.unwrap();
    }
    let mut a = tokio_test::task::spawn(svc.clone().oneshot(secret_get()));
    let mut b = tokio_test::task::spawn(svc.clone().oneshot(secret_get()));
    tokio_test::assert_pending!(a.poll());
    tokio_test::assert_pending!(b.poll());
    tokio::time::advance(ms(25)).await;
    tokio_test::assert_pending!(a.poll());
    let mut debug = String::new();
    debug.push_str(&format!("{a:?} {b:?} {svc:?} {coal:?} {hedge:?} {conc:?}"));
    debug.push_str(&format!("{kh:?} {hh:?} {ch:?} {:?}", ch.states()));
    debug.push_str(&format!("{:?} {:?}", hh.all(), kh.stats()));
    assert_clean("Debug", &debug);
    tokio::time::advance(ms(600)).await;
    tokio_test::assert_ready_ok!(a.poll());
    tokio_test::assert_ready_ok!(b.poll());
    assert_clean("logs", &cap.text());
}

/// docs/guides/hedge.md: "Each hedgeable call adds 0.05 of a hedge, each hedge spends one" and
/// `HedgeStats::hedges`: "Second copies sent: the extra requests". A hedge that is due but never
/// sent (its clone failed to become ready) is no extra request: with a budget of exactly one
/// token, the next slow call is still hedged.
#[tokio::test(start_paused = true)]
async fn s37_a_hedge_that_was_not_sent_spends_no_token() {
    let (mock, mut mh) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(3)
        .with_delay_bounds(ms(5), ms(5))
        .with_budget(0.0, 1)
        .unwrap()
        .pair();
    let svc = layer.layer(mock);
    let get = || Request::get("http://api.example.com/x").body(()).unwrap();
    for _ in 0..3 {
        mh.allow(1);
        let call = tokio::spawn(svc.clone().oneshot(get()));
        let (_req, send) = mh.next_request().await.unwrap();
        send.send_response(Response::new(()));
        call.await.unwrap().unwrap();
    }
    // Slow call 1: the hedge is due but its clone fails to become ready.
    mh.allow(1);
    let mut call = tokio_test::task::spawn(svc.clone().oneshot(get()));
    tokio_test::assert_pending!(call.poll());
    let (_req, send) = mh.next_request().await.unwrap();
    mh.send_error("pool closed");
    tokio::time::advance(ms(6)).await;
    tokio_test::assert_pending!(call.poll());
    send.send_response(Response::new(()));
    tokio_test::assert_ready_ok!(call.poll());
    assert_eq!(handle.stats("api.example.com").unwrap().hedges(), 0);
    // Slow call 2: a ready clone; the one token should still be there.
    mh.allow(1);
    let mut call = tokio_test::task::spawn(svc.clone().oneshot(get()));
    tokio_test::assert_pending!(call.poll());
    let (_req, _slow) = mh.next_request().await.unwrap();
    mh.allow(1);
    tokio::time::advance(ms(6)).await;
    tokio_test::assert_pending!(call.poll());
    assert_eq!(
        handle.stats("api.example.com").unwrap().hedges(),
        1,
        "the token was spent by a hedge never sent"
    );
    let (_req, send) = mh.next_request().await.unwrap();
    send.send_response(Response::new(()));
    tokio_test::assert_ready_ok!(call.poll());
}

/// hedge.md: "Over a `ConcurrencyLimit(1)` (or a full limit), the first copy holds the permit, so
/// the hedge waits for one and the first answer wins" and `HedgeStats::hedges`: "Second copies
/// sent". A hedge still waiting for readiness when the first copy answers was never sent: it is
/// not counted and no `HedgeSent` event is emitted.
#[tokio::test(start_paused = true)]
async fn s37_a_hedge_left_waiting_for_readiness_is_not_counted_as_sent() {
    let sent = Arc::new(AtomicUsize::new(0));
    let s2 = sent.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let api = service_fn(move |_req: Request<()>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(if i == 5 { 200 } else { 10 })).await;
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(ms(20), ms(20))
        .on_event(move |e| {
            if matches!(e, sturdy::core::events::Event::HedgeSent { .. }) {
                s2.fetch_add(1, Ordering::SeqCst);
            }
        })
        .pair();
    let svc = layer.layer(tower::limit::ConcurrencyLimitLayer::new(1).layer(api));
    let get = || Request::get("http://api.example.com/x").body(()).unwrap();
    for _ in 0..5 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    let start = tokio::time::Instant::now();
    svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(start.elapsed(), ms(200));
    assert_eq!(
        n.load(Ordering::SeqCst),
        6,
        "no second copy reached the service"
    );
    let stats = handle.stats("api.example.com").unwrap();
    assert_eq!((stats.hedges(), stats.hedge_wins()), (0, 0));
    assert_eq!(sent.load(Ordering::SeqCst), 0);
}
