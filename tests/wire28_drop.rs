//! The caller's future dropped at arbitrary moments (seeded) while the composed client deals with
//! a hostile peer: the peer must never see a request sent after the drop.

use std::time::Duration;
use tokio::time::Instant;

use sturdy::hedge::HedgeLayer;
use sturdy::ClientBuilder;
use tower::ServiceExt;

use crate::wire28_util::*;

const MS: fn(u64) -> Duration = Duration::from_millis;

/// Drops a call to `p` after `at`, then checks that the peer's request count stops moving.
async fn drop_at(
    client: &sturdy::Client<hyper::body::Incoming>,
    p: &Peer,
    url: &str,
    at: Duration,
    post_it: bool,
) {
    let req = if post_it { post(url) } else { get(url) };
    let out = tokio::time::timeout(at, client.clone().oneshot(req)).await;
    if out.is_ok() {
        return;
    }
    // A request being written at the moment of the drop may still arrive; give it 30 ms.
    tokio::time::sleep(MS(30)).await;
    let settled = p.seen.requests();
    tokio::time::sleep(MS(150)).await;
    assert_eq!(
        p.seen.requests(),
        settled,
        "a request reached the peer after the call was dropped at {at:?}"
    );
}

#[tokio::test]
async fn wire28_drop_during_the_backoff_sends_nothing_more() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.reset();
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(
            sturdy::retry::RetryLayer::new()
                .with_backoff(
                    sturdy::retry::Backoff::decorrelated_jitter(MS(100), MS(200)).unwrap(),
                )
                .with_seed(28),
        )
        .with_attempt_timeout(MS(500))
        .build(hyper_client());
    let out = tokio::time::timeout(MS(40), client.clone().oneshot(get(&p.url("/a")))).await;
    assert!(out.is_err());
    assert_eq!(p.seen.requests(), 1);
    tokio::time::sleep(MS(400)).await;
    assert_eq!(p.seen.requests(), 1, "the retry went out after the drop");
}

#[tokio::test]
async fn wire28_drop_at_seeded_moments_against_resets() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        tokio::time::sleep(MS(3)).await;
        c.reset();
    })
    .await;
    let client = client(MS(200));
    let mut rng = Seeded::new(2828);
    for i in 0..12 {
        let at = MS(1 + rng.below(40));
        drop_at(&client, &p, &p.url(&format!("/r{i}")), at, i % 2 == 0).await;
    }
}

#[tokio::test]
async fn wire28_drop_at_seeded_moments_against_stalls() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.wait_close().await;
    })
    .await;
    let client = client(MS(15));
    let mut rng = Seeded::new(77);
    for i in 0..10 {
        let at = MS(1 + rng.below(60));
        drop_at(&client, &p, &p.url(&format!("/s{i}")), at, i % 3 == 0).await;
    }
    // Every connection the dropped calls left is closed in the end.
    let conns = p.seen.conns();
    assert!(
        eventually(|| p.seen.closed() == conns).await,
        "{} of {conns}",
        p.seen.closed()
    );
}

#[tokio::test]
async fn wire28_drop_while_waiting_out_a_pause() {
    // The first answer pauses the host for 300 ms; a call made then waits in line and is
    // dropped there: nothing of it reaches the peer.
    let p = peer(|mut c| async move {
        while c.read_request().await.is_some() {
            let first = c.seen.requests() == 1;
            let answer: &[u8] = if first {
                b"HTTP/1.1 200 OK\r\nratelimit: \"q\";r=0;t=1\r\ncontent-length: 0\r\n\r\n"
            } else {
                OK
            };
            if !c.write(answer).await {
                return;
            }
        }
    })
    .await;
    let client = client(MS(500));
    within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    let start = Instant::now();
    let out = tokio::time::timeout(MS(100), client.clone().oneshot(post(&p.url("/b")))).await;
    assert!(out.is_err(), "not held by the pause");
    tokio::time::sleep(MS(1200).saturating_sub(start.elapsed())).await;
    assert_eq!(p.seen.requests(), 1);
}

#[tokio::test]
async fn wire28_drop_of_a_hedged_call_closes_both_copies() {
    // A warmed-up hedging client; then the peer stalls every request, the call is hedged, and
    // dropped: both connections are closed, and no third copy follows.
    let stall = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stall.clone();
    let p = peer(move |mut c| {
        let s = s.clone();
        async move {
            while c.read_request().await.is_some() {
                if s.load(std::sync::atomic::Ordering::SeqCst) {
                    c.wait_close().await;
                    return;
                }
                if !c.write(OK).await {
                    return;
                }
            }
        }
    })
    .await;
    let (hedge, handle) = HedgeLayer::new()
        .with_min_samples(10)
        .with_delay_bounds(MS(5), MS(20))
        .pair();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_hedge(hedge)
        .with_attempt_timeout(MS(2000))
        .build(hyper_client());
    for i in 0..30 {
        let res = within(5, client.clone().oneshot(get(&p.url(&format!("/w{i}")))))
            .await
            .unwrap();
        http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap();
    }
    stall.store(true, std::sync::atomic::Ordering::SeqCst);
    let before = p.seen.requests();
    let closed_before = p.seen.closed();
    let out = tokio::time::timeout(MS(150), client.clone().oneshot(get(&p.url("/slow")))).await;
    assert!(out.is_err());
    let sent = p.seen.requests() - before;
    assert_eq!(
        sent,
        2,
        "hedges: {:?}",
        handle.stats(&p.authority()).map(|s| s.hedges())
    );
    assert!(eventually(|| p.seen.closed() - closed_before == 2).await);
    tokio::time::sleep(MS(100)).await;
    assert_eq!(p.seen.requests() - before, 2);
}

#[tokio::test]
async fn wire28_hedge_answers_when_the_first_copy_stalls() {
    let p = peer(|mut c| async move {
        while c.read_request().await.is_some() {
            // Every 25th request stalls; the rest answer at once.
            if c.seen.requests() % 25 == 0 {
                c.wait_close().await;
                return;
            }
            if !c.write(OK).await {
                return;
            }
        }
    })
    .await;
    let hedge = HedgeLayer::new()
        .with_min_samples(10)
        .with_delay_bounds(MS(5), MS(20));
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_hedge(hedge)
        .with_attempt_timeout(MS(2000))
        .build(hyper_client());
    let start = Instant::now();
    for i in 0..60 {
        let res = within(5, client.clone().oneshot(get(&p.url(&format!("/h{i}")))))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap();
    }
    // Two calls met a stalled first copy; each was rescued by its hedge well before the 2 s
    // attempt timeout.
    assert!(start.elapsed() < MS(1500), "{:?}", start.elapsed());
    assert!(eventually(|| p.seen.closed() >= 1).await);
}
